"""The ``hmar`` command. Each subcommand lives in its own module of this package, which exposes
``register(subparsers)``; a handler returns an exit status. :class:`hmar.errors.HMARError`
(and missing files) end the program with a one-line ``error:`` message, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, NoReturn, Optional

from ..errors import HMARError

# one module per family of subcommands; a module whose optional dependencies are missing is skipped
_MODULES = ("sample", "convert", "train", "edit", "data", "evaluate", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="hmar",
        description="HMAR: hierarchical masked auto-regressive image generation (and the VAR baseline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(f"{__name__}.{name}"):
                continue  # that subcommand is not part of this build
            raise
        mod.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except HMARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, a file where a folder should be, a full disk, ...
        print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # a training run stopped by a signal has said where it saved (TrainingInterrupted)
        if not str(e):
            print("interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))


def entry() -> NoReturn:
    """The ``hmar`` executable (and ``python -m hmar``): :func:`main`, then exit with its status; a torchrun worker
    through :func:`hmar.training.distributed.exit_process` (it skips interpreter shutdown, which can abort one)."""
    code = main()
    distributed = sys.modules.get("hmar.training.distributed")   # imported by every command that can join a group
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
