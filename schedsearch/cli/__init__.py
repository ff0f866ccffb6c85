"""The ``schedsearch`` command: one module per command, each adding its subcommands through
``register(subparsers)``, and ``main``, which turns bad input into one line and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..version import __version__

# Command modules, in the order their subcommands appear in --help.
COMMANDS = ["run", "schedule", "sample", "score", "refstats", "distill", "presets", "ui"]


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="schedsearch",
        description="Find the best few-step sampling schedule (σ list, solver, FreeU plan) for a "
                    "diffusion model without retraining it. Every command defaults to the built-in "
                    "'digits' testbed, which runs on any CPU with no downloads.",
        epilog="Start with:  schedsearch run --budget 5",
    )
    parser.add_argument("--version", action="version", version=f"schedsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("SCHEDSEARCH_DEBUG"):
            raise
        print(f"schedsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
