"""``python -m vlakit.serve BUNDLE_DIR [options]``: the same as ``vlakit serve``."""

import sys

from vlakit.serve.command import main

if __name__ == "__main__":
    sys.exit(main())
