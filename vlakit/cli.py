"""The ``vlakit`` command: ``vlakit train --model pkg.module:build --data FOLDER ...`` and
``vlakit serve BUNDLE_DIR ...`` (also ``python -m vlakit ...``; under ``torchrun``:
``torchrun --nproc_per_node=N -m vlakit train ...``).

No config files: a model is a Python callable, a policy is a bundle directory
([PolicyBundle.save][vlakit.bundle.PolicyBundle.save]), options are flags, and the API key
comes from an environment variable (never the command line, where ``ps`` shows it).
"""

import argparse
import importlib
import logging
import sys
from typing import Any

from vlakit.recipe import add_arguments
from vlakit.serve import command as serve_command

__all__ = ["main", "load_builder"]


def load_builder(spec: str) -> Any:
    """The callable ``pkg.module:name`` names (imported; the current directory is on the
    path). Raises ``ValueError`` naming what is wrong."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--model {spec!r}: expected 'package.module:function' (a builder "
                         f"called as build(dataset, tokenizer) -> VLA)")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        target = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        raise ValueError(f"--model {spec!r}: cannot import {module!r} ({error})") from None
    except AttributeError:
        raise ValueError(f"--model {spec!r}: {module!r} has no {name!r}") from None
    if not callable(target):
        raise ValueError(f"--model {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model with vlakit's recipe",
                       description="Train a model with vlakit's recipe (vlakit.recipe.train) "
                       "on a LeRobot v3 folder; writes loss.csv, loss.png, a checkpoint and a "
                       "policy bundle under --out.")
    p.add_argument("--model", required=True, metavar="PKG.MODULE:BUILD",
                   help="a builder called as build(dataset, tokenizer) -> VLA")
    p.add_argument("--data", required=True, help="a LeRobot v3 dataset folder")
    p.add_argument("--chunk", type=int, default=4, help="actions per chunk")
    p.add_argument("--preload", action="store_true", help="decode every video once and "
                   "hold the frames in memory (LeRobotDataset(preload=True))")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (AutoTokenizer); "
                   "default: a word tokenizer of the dataset's tasks (tiny models)")
    add_arguments(p)


def train(args: argparse.Namespace) -> None:
    """Build the dataset, the tokenizer and (seeded) the model, then run the recipe."""
    import torch

    from vlakit.data import LeRobotDataset
    from vlakit.processors import OPENVLA_PROMPT, word_tokenizer
    from vlakit.recipe import RecipeError, options_from
    from vlakit.recipe import train as run

    try:
        build = load_builder(args.model)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # checks the folder first
    dataset = LeRobotDataset(args.data, chunk_size=args.chunk, preload=args.preload)
    if args.tokenizer is None:
        tokenizer = word_tokenizer([OPENVLA_PROMPT, *dataset.tasks.values()])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build(dataset, tokenizer)
    try:
        run(model, dataset, tokenizer, options_from(args))
    except RecipeError as error:
        raise SystemExit(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlakit`` console script."""
    parser = argparse.ArgumentParser(prog="vlakit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    serve_command.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    if args.command == "serve":
        serve_command.serve(args)
    elif args.command == "train":
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
