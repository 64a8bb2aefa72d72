"""``mmcontour import-dicom``: planning CT + RTSTRUCT exports -> a training manifest (``dicom.archive``)."""
from __future__ import annotations

import argparse
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
    p.add_argument("--structure-map", type=Path, metavar="MAP",
                   help="CSV (pattern,region[,side][,reason]) or JSON rules mapping the hospital's structure names to "
                        "regions; its rules come before the defaults, so they override them")
    p.add_argument("--write-map", action=_WriteStructureMap, metavar="FILE",
                   help="write the default structure map to FILE (CSV, or JSON for .json) to edit into a "
                        "--structure-map, and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(func=run)


class _WriteStructureMap(argparse.Action):
    """Acts while parsing (as --version does), so it needs none of the import's required options."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..dicom.structure_map import write_structure_map

        parser.exit(message=f"wrote the default structure map to {write_structure_map(values)}\n")


def run(args) -> dict:
    """The summary the CLI prints with --json ("failed" when no case was imported, so the command exits
    non-zero)."""
    from ..dicom.archive import import_dicom
    from ..dicom.structure_map import read_structure_map

    try:
        structure_map = read_structure_map(args.structure_map) if args.structure_map else None
        report = import_dicom(args.in_dir, args.clinical, args.out, patterns=args.pattern, exclude=args.exclude,
                              progress=not args.json and sys.stderr.isatty(), overwrite=args.overwrite,
                              structure_map=structure_map)
    except (FileExistsError, FileNotFoundError) as exc:
        raise ValueError(str(exc)) from None
    summary = report.summary()
    if not report.imported:
        summary["failed"] = True
    if not args.json:
        print(f"imported {summary['imported']} case(s) into {report.manifest}; skipped {summary['skipped']} "
              f"(listed in {report.out_dir / 'skipped.csv'})")
        for case in report.imported:
            print(f"  {case['case_id']}: {_mapping_line(case['structure_map'])}")
        for s in report.skipped:
            print(f"  skipped {s.patient_id or '?'} [{s.reason}]: {s.message}")
        for w in report.warnings:
            print(f"  note: {w}")
    return summary


def _mapping_line(mapping: dict) -> str:
    """One line of the printed summary: what each structure name of a case became."""
    parts = [", ".join(f"{n} -> {r}" for n, r in mapping["mapped"].items()) or "no region"]
    if mapping["union_only"]:
        parts.append("union only: " + ", ".join(mapping["union_only"]))
    if mapping["ignored"]:
        parts.append("ignored: " + ", ".join(f"{n} ({r})" for n, r in mapping["ignored"].items()))
    if mapping["unrecognised"]:
        parts.append("NOT RECOGNISED: " + ", ".join(mapping["unrecognised"]))
    return "; ".join(parts) + ("" if mapping["regions_map"] else f" [no regions map: {mapping['regions_note']}]")
