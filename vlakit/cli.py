"""The ``vlakit`` command: ``vlakit serve BUNDLE_DIR [options]``.

No config files: a policy is a bundle directory
([PolicyBundle.save][vlakit.bundle.PolicyBundle.save]), options are flags, and the API key
comes from an environment variable (never the command line, where ``ps`` shows it).
"""

import argparse
import logging
import sys

from vlakit.serve import command as serve_command

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlakit`` console script."""
    parser = argparse.ArgumentParser(prog="vlakit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_command.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    if args.command == "serve":
        serve_command.serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
