"""``vlakit serve BUNDLE_DIR`` (and ``python -m vlakit.serve BUNDLE_DIR``): the options and
what they run."""

import argparse
import logging
import os
import sys

from vlakit.serve.server import API_KEY_ENV, PolicyServer, warm_up

__all__ = ["add_parser", "serve", "main"]

_DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub) -> None:
    """Add the ``serve`` command to an argparse ``sub``-parsers object."""
    p = sub.add_parser("serve", help="serve a policy bundle over openpi's websocket protocol",
                       description="Serve a policy bundle to robots over openpi's websocket "
                       "protocol (openpi-client connects unmodified).")
    p.add_argument("bundle", help="a policy bundle directory (PolicyBundle.save)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (openpi's 8000)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="parameter dtype")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="compile_for_inference (MODE: default, reduce-overhead = CUDA "
                   "graphs, max-autotune)")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long a request waits for others to batch with (0: no wait)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per forward at most")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="NAME",
                   help=f"environment variable holding the API key (default {API_KEY_ENV}; "
                   f"unset: no key required)")
    p.add_argument("--max-message-mb", type=float, default=32.0,
                   help="larger frames are refused")
    p.add_argument("--no-stage-timing", action="store_true",
                   help="do not time the prefix and the denoising steps apart")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="a module of your own the bundle's model names (repeatable)")


def serve(args: argparse.Namespace) -> None:
    """Load the bundle, warm it up, serve until interrupted."""
    import torch

    from vlakit.bundle import PolicyBundle

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    bundle = PolicyBundle.load(args.bundle, device=device, dtype=dtype,
                               trust=tuple(args.trust))
    if args.compile is not None:
        bundle.model.compile_for_inference(mode=None if args.compile == "default"
                                           else args.compile)
    log = logging.getLogger("vlakit.serve")
    log.info("loaded %s on %s; warm-up prediction %.0f ms", args.bundle, device,
             warm_up(bundle))
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key (%s is unset): any client that reaches %s:%d can drive the "
                    "robot", args.api_key_env, args.host, args.port)
    PolicyServer(bundle, host=args.host, port=args.port,
                 batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                 api_key=api_key, max_message_bytes=int(args.max_message_mb * 2**20),
                 stage_timing=not args.no_stage_timing).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m vlakit.serve``: the ``serve`` command alone."""
    parser = argparse.ArgumentParser(prog="python -m vlakit.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    serve(args)
    return 0
