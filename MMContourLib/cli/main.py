"""The ``mmcontour`` command: one module per subcommand, each with ``register(subparsers)`` (light imports, so
``mmcontour --help`` loads neither torch nor MONAI) and the function it runs (which imports the heavy parts)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from . import (bench, calibrate_review, demo, evaluate, import_dicom, merge, phantom, predict, read_note, side_flips,
               train)
from .common import UsageError

#: The subcommand modules, in the order ``mmcontour --help`` lists them.
COMMANDS = (predict, phantom, merge, side_flips, train, evaluate, calibrate_review, demo, read_note, import_dicom, bench)


#: What each failure exit status means (printed with it under --json).
MEANINGS = {
    1: "the run finished but some cases failed (see cases), or an internal error (a bug: please report it)",
    2: "refused: a bad argument, input or output location, or a file that could not be written; nothing was "
       "written (fix what the error says and run again)",
    130: "interrupted: what was finished is kept, nothing is half-written",
}


class ArgumentsRefused(SystemExit):
    """argparse's usage error (exit 2), keeping its message for the --json answer."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise ArgumentsRefused(message)


def failure(code: int, error: str) -> dict:
    """The --json answer of a run that failed."""
    return {"ok": False, "error": error, "exit_code": code, "meaning": MEANINGS[code]}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmcontour", description="Clinical-note-conditioned breast CTV contouring.")
    parser.add_argument("--version", action="version", version=f"mmcontour {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    from ..image.fileio import WriteError
    from ..note.clinical import ContradictionError, NoteError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    wants_json = "--json" in argv

    def answer(data) -> None:
        if wants_json:
            print(json.dumps(data, indent=2, default=str))

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgumentsRefused as exc:
        answer(failure(2, exc.message))
        raise
    known = (UsageError, NoteError, ContradictionError, FileNotFoundError, ValueError, RuntimeError, WriteError)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("mmcontour: interrupted; files are written whole or not at all, so what was finished is kept "
              "and nothing is left half-written", file=sys.stderr)
        answer(failure(130, "interrupted"))
        return 130
    except known as exc:
        answer(failure(2, str(exc)))
        if os.environ.get("MMCONTOUR_DEBUG"):
            raise
        print(f"mmcontour {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: the traceback follows on stderr
        answer(failure(1, f"{exc.__class__.__name__}: {exc}"))
        raise
    if isinstance(result, int):  # the command printed its own answer (read-note: exactly the reading)
        return result
    failed = isinstance(result, dict) and bool(result.get("failed"))
    if failed:  # the summary's own "ok" (the count of cases contoured) stays: it is the answer's data
        result = {**failure(1, f"{result['failed']} case(s) failed"), **result}
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
