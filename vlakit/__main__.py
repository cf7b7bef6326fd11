"""``python -m vlakit train ...`` / ``python -m vlakit serve ...``: the ``vlakit`` command
(``torchrun --nproc_per_node=N -m vlakit train ...`` for several processes)."""

import sys

from vlakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
