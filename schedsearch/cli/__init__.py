"""The ``schedsearch`` command: one module per command, each adding its subcommands through
``register(subparsers)``, and ``main``, which turns bad input into one line and exit status 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import warnings
from pathlib import Path

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


# Errors of the file system under an output path: each one is the user's to fix (another folder,
# permissions, space), so the command says which path and what to do instead of a traceback.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_OUTPUT_ERRORS = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                  errno.EROFS, errno.ENOENT, *_FULL)


def _blocking_file(path: Path) -> Path | None:
    """The first existing component of ``path`` that is a file where a folder is needed."""
    for part in [path, *path.parents][::-1]:
        if part.exists() and not part.is_dir():
            return part
    return None


def output_error(exc: OSError, args) -> str | None:
    """One line for a file-system error under an output path (None: not one of those). An error
    from writing an open file names no path: then the command's --out (or --to) is named."""
    if exc.errno not in _OUTPUT_ERRORS:
        return None
    # export's --out is the study it reads; its output is --to
    target = getattr(args, "to", None) or getattr(args, "out", None)
    path = exc.filename2 or exc.filename or target   # filename2: where a rename was going
    if path is not None and Path(path).name.startswith(".") and Path(path).name.endswith(".tmp"):
        path = Path(path).parent  # files.atomic_write's temporary file: name its folder
    where = f"'{path}'" if path is not None else "the output"
    flag = "--to" if getattr(args, "to", None) else "--out"
    p, t = Path(path or ".").absolute(), Path(target or ".").absolute()   # --out may be relative
    output = None not in (path, target) and (p == t or p in t.parents or t in p.parents)
    if exc.errno == errno.ENOENT and not output:
        return None   # a missing input file: its reader's own message says which
    instead = f"choose another {flag}" if output else "choose another path"
    if exc.errno in _FULL:
        return (f"no space left on the disk holding {where}; free some space there or "
                f"{instead} on another disk")
    blocker = _blocking_file(Path(path)) if path is not None else None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and blocker is not None:
        return (f"cannot create {where}: '{blocker}' is a file, not a folder; remove or rename "
                f"it, or {instead}")
    if exc.errno == errno.EISDIR and not output:   # an input (--config DIR): nothing is written
        return f"{where} is a folder, not a file; give the file's path"
    if exc.errno == errno.EISDIR:
        return f"cannot write {where}: it is a folder, not a file; give a file name or {instead}"
    if exc.errno == errno.EROFS:
        return f"cannot write {where}: it is on a read-only file system; {instead}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied for {where}; {instead}"
                f"{' in a folder you can write to' if output else ''}, or change its permissions")
    return f"cannot write {where} ({exc.strerror}); {instead}"


def memory_error(exc: Exception, args) -> str | None:
    """One line for running out of GPU or CPU memory (None: not that). The batch is what a user
    can change: every batch of a study is as large, so each trial would run out again."""
    text = str(exc)
    gpu = type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text
    if not (gpu or isinstance(exc, MemoryError) or "can't allocate memory" in text):
        return None
    found = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B\b|\d+ bytes)", text)
    amount = found.group(1) if found else None
    if amount and amount.endswith(" bytes"):
        amount = f"{int(amount.split()[0]) / 2 ** 30:.3g} GiB"
    size = getattr(args, "batch_size", None)
    return (f"out of {'GPU' if gpu else 'CPU'} memory{f' allocating {amount}' if amount else ''}"
            f": lower --batch-size{f' (now {size})' if size else ''}"
            f"{', or use --dtype fp16' if gpu and getattr(args, 'dtype', None) != 'fp16' else ''}"
            f"; a study resumes where it stopped")


def _wrapped_os_error(exc: Exception) -> OSError | None:
    """The OSError behind a library's own exception: safetensors reports a failed write (a full
    disk for ``refstats --out``) as SafetensorError "... (os error 28) at path ..."."""
    if not type(exc).__module__.startswith("safetensors"):
        return None
    code, path = (re.search(r"\(os error (\d+)\)", str(exc)),
                  re.search(r'at path "([^"]*)"', str(exc)))
    if code is None:
        return None
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))),
                   path.group(1) if path else None)


def _one_line_warnings(command: str):
    """schedsearch's own warnings (e.g. a teacher cache it could not write) as one line each, like
    its errors; Python's format would add a line of our source. Other libraries' keep theirs."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("schedsearch"):
            print(f"schedsearch {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, sys.argv[1:] if argv is None else argv, extra)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    empty = _empty_option(_subparser(parser, sys.argv[1:] if argv is None else argv), args)
    if empty:
        print(f"schedsearch {args.command}: error: {empty.option_strings[-1]} is empty: give it "
              f"a value{'' if empty.required else ', or leave it out for its default'}",
              file=sys.stderr)
        return 2
    with warnings.catch_warnings():   # restored on return: main() is also called in-process
        warnings.showwarning = _one_line_warnings(args.command)
        return _handle(args)


def _subparser(parser: argparse.ArgumentParser, argv: list) -> argparse.ArgumentParser:
    """The (sub)command's parser the arguments were given to; argparse has no public way to reach
    a subcommand's parser or its flags, so this reads _actions (stable since Python 3.2)."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


# Options where '' means something: score's --checkpoints '' is "no intermediate FID", and a
# workflow's --prompt '' an empty positive prompt (sample's --prompt '', unconditional, is a list)
EMPTY_MEANS = {"checkpoints", "prompt"}


def _empty_option(parser: argparse.ArgumentParser, args) -> argparse.Action | None:
    """The first option given as '' or blanks, if any: an unset shell variable (--prompts
    "$PROMPTS") read as "not given" and ran the command on its default without a word."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and action.dest not in EMPTY_MEANS and isinstance(value, str) \
                and not value.strip():
            return action
    return None


def _unrecognized(parser: argparse.ArgumentParser, argv: list, extra: list) -> None:
    """Unknown arguments, said by the command they were given to (argparse's top level said
    'schedsearch: error' with the usage of every command) with the flag a typo was likely meant
    as; exits with status 2 like any argparse error."""
    import difflib

    parser = _subparser(parser, argv)
    flags = [s for a in parser._actions for s in a.option_strings]
    near = [f"{m[0]} for {e}" for e in extra if e.startswith("--")
            if (m := difflib.get_close_matches(e.split("=")[0], flags, 1, 0.7))]
    parser.error(f"unrecognized arguments: {' '.join(extra)}"
                 + (f" (did you mean {', '.join(near)}?)" if near else ""))


def _handle(args) -> int:
    """Run the command; bad input becomes one line and exit status 2."""
    debug = bool(os.environ.get("SCHEDSEARCH_DEBUG"))
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        if debug:
            raise
        # a folder that cannot be made where --out points (e.g. inside /proc) is ENOENT too
        line = output_error(exc, args) if isinstance(exc, OSError) and exc.errno else None
        print(f"schedsearch {args.command}: error: {line or exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``schedsearch schedule karras | head -3``): stop quietly, as a
        # tool killed by SIGPIPE would; stdout goes to devnull so the exit flush cannot fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # an OSError (or one in disguise) under an output path, running out
        # of memory; anything else is raised
        err = exc if isinstance(exc, OSError) else _wrapped_os_error(exc)
        line = output_error(err, args) if err is not None else memory_error(exc, args)
        if debug or line is None:
            raise
        print(f"schedsearch {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
