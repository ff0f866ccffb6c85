"""The ``schedsearch`` command. Each module of this package adds its subcommands through
``register(subparsers)``; handlers import the heavy libraries lazily so ``--help`` is quick."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

# Command modules in the order their subcommands appear in --help.
ORDER = ["run", "schedule", "sample", "score", "refstats", "teacher", "baselines", "presets", "ui"]


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="schedsearch",
        description="Find the best few-step sampling schedule (σ list, solver, FreeU plan) for a "
                    "diffusion model without retraining it. Every command defaults to the built-in "
                    "'digits' testbed, which runs on any CPU with no downloads.",
        epilog="Start with:  schedsearch run --budget 5",
    )
    parser.add_argument("--version", action="version", version=f"schedsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    for name in [n for n in ORDER if n in found] + sorted(found - set(ORDER)):
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
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
