"""The ``mmcontour`` command: one module per subcommand, each with ``register(subparsers)`` (light imports, so
``mmcontour --help`` loads neither torch nor MONAI) and the function it runs (which imports the heavy parts)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from . import bench, demo, evaluate, import_dicom, phantom, predict, read_note, train
from .common import UsageError

#: The subcommand modules, in the order ``mmcontour --help`` lists them.
COMMANDS = (predict, phantom, train, evaluate, demo, read_note, import_dicom, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcontour", description="Clinical-note-conditioned breast CTV contouring.")
    parser.add_argument("--version", action="version", version=f"mmcontour {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    from ..image.fileio import WriteError
    from ..note.clinical import ContradictionError, NoteError

    parser = build_parser()
    args = parser.parse_args(argv)
    known = (UsageError, NoteError, ContradictionError, FileNotFoundError, ValueError, RuntimeError, WriteError)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("mmcontour: interrupted; files are written whole or not at all, so what was finished is kept "
              "and nothing is left half-written", file=sys.stderr)
        return 130
    except known as exc:
        if os.environ.get("MMCONTOUR_DEBUG"):
            raise
        print(f"mmcontour {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, int):  # the command printed its own answer (read-note: exactly the reading)
        return result
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("failed"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
