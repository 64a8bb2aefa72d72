"""``mmcontour import-dicom``: planning CT + RTSTRUCT exports -> a training manifest (``dicom.archive``)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..dicom.archive import DEFAULT_CTV_PATTERNS, DEFAULT_EXCLUDE_PATTERNS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-dicom", help="convert planning CT + RTSTRUCT exports into a training manifest",
        description="Walk a folder of exported studies, pair each CT series with its RTSTRUCT, take the CTV "
                    "(union of the structures matching --pattern), join the clinical table by patient_id and write "
                    "NIfTI + manifest.csv. Every case not imported is listed in skipped.csv with the reason.")
    p.add_argument("--in", dest="in_dir", required=True, type=Path,
                   help="folder of DICOM exports (searched recursively)")
    p.add_argument("--clinical", required=True, type=Path, help="CSV keyed by patient_id with the note fields "
                                                                "(and optionally split)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--pattern", action="append", metavar="GLOB",
                   help=f"CTV structure-name pattern, case-insensitive; repeat; replaces the defaults "
                        f"({' '.join(DEFAULT_CTV_PATTERNS)})")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help=f"structure names never used; repeat; replaces the defaults "
                        f"({' '.join(DEFAULT_EXCLUDE_PATTERNS)})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(func=run)


def run(args) -> dict:
    """The summary the CLI prints with --json ("failed" when no case was imported, so the command exits
    non-zero)."""
    from ..dicom.archive import import_dicom

    try:
        report = import_dicom(args.in_dir, args.clinical, args.out,
                              patterns=tuple(args.pattern or DEFAULT_CTV_PATTERNS),
                              exclude=tuple(args.exclude or DEFAULT_EXCLUDE_PATTERNS),
                              progress=not args.json and sys.stderr.isatty(), overwrite=args.overwrite)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    summary = report.summary()
    if not report.imported:
        summary["failed"] = True
    if not args.json:
        print(f"imported {summary['imported']} case(s) into {report.manifest}; skipped {summary['skipped']} "
              f"(listed in {report.out_dir / 'skipped.csv'})")
        for s in report.skipped:
            print(f"  skipped {s.patient_id or '?'} [{s.reason}]: {s.message}")
        for w in report.warnings:
            print(f"  note: {w}")
    return summary
