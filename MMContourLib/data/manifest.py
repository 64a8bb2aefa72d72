"""The case manifest: one CSV row per case (columns: docs/INTERFACES.md), its one reader, writer and error.

Columns: ``MANIFEST_COLUMNS`` (the files, the split, the clinical note's fields; paths relative to
the CSV's folder) and the optional ``regions`` (phantoms: the sub-region label map) and ``note``
(free text; what it and the structured fields both state must agree). Training reads it as ``Case``
objects (``read_cases``: every row checked, a CTV required); the contouring batch reads plain rows
(``read_manifest``), checked up front or, without ``check``, row by row as the cases run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..image.fileio import write_text
from ..note.clinical import FIELDS, ClinicalNote, ContradictionError, NoteError, note_from_parts
from ..note.freetext import NoteReadingError, read_note

MANIFEST_COLUMNS = ("case_id", "ct", "ctv", "split") + FIELDS
#: Written after MANIFEST_COLUMNS when a row has them.
OPTIONAL_COLUMNS = ("regions", "note")
PATH_COLUMNS = ("ct", "ctv", "regions")
NOTE_COLUMNS = ("side", "n_stage", "surgery")  # the structured note's minimum, when there is no 'note' column
#: A case id names output files (DIR/<case_id>.seg.nrrd, overlays), so it must be a safe file name.
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and, where known, the line, case and column."""

    def __init__(self, path, problem: str, line: int | None = None, case: str | None = None,
                 column: str | None = None):
        where = f"manifest {path}" + (f", line {line}" if line else "") + (f" (case {case or '?'})" if line else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.case, self.column = Path(path), line, case, column


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    def __init__(self, path):
        ValueError.__init__(self, f"manifest not found: {path}")
        self.path, self.line, self.case, self.column = Path(path), None, None, None


def note_for(row: Mapping[str, str]) -> ClinicalNote:
    """The row's clinical note: its free-text ``note`` and the structured fields, which must agree."""
    return note_from_parts(row.get("note"), row, text_name="the 'note' column", field_name="the '{}' column",
                           reader=read_note)


def read_manifest(path: str | os.PathLike, split: str | None = None, check: bool = False,
                  require: Sequence[str] = ()) -> list[dict[str, str]]:
    """The rows of a manifest (only those whose ``split`` is ``split``, if given), stripped, with the
    path columns resolved against the CSV's folder; case ids checked to be unique, usable file names.

    ``check``: every selected row is checked now (its note parses, its files exist) and a bad row, or
    no row at all, fails the whole manifest; without it a bad row is the caller's to report.
    ``require``: columns that must exist and be filled on every selected row (training: split, ctv)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestNotFoundError(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if split is not None and "split" not in columns:
        raise ManifestError(path, f"split {split!r} asked for, but the manifest has no 'split' column", column="split")
    needed = list(dict.fromkeys(["case_id", "ct", *require]))
    missing = [c for c in needed if c not in columns]
    if check and "note" not in columns:
        missing += [c for c in NOTE_COLUMNS if c not in columns]
    if missing:
        note = f" and the note: a 'note' column or {', '.join(NOTE_COLUMNS)}" if check else ""
        raise ManifestError(path, f"lacks the column(s) {', '.join(missing)} (has: {', '.join(columns)}); it needs "
                                  f"{', '.join(needed)}{note} (all columns: {', '.join(MANIFEST_COLUMNS)}; "
                                  "paths relative to the CSV)", column=missing[0])
    selected = [(line, row) for line, row in enumerate(rows, start=2)  # line 1 is the header
                if split is None or row.get("split") == split]
    seen: dict[str, int] = {}
    for line, row in selected:
        case = row["case_id"]
        if not CASE_ID.fullmatch(case):
            raise ManifestError(path, f"case_id {case!r} must be letters, digits, '.', '_' or '-' "
                                      "(it names the output files)", line, case, "case_id")
        if case in seen:
            raise ManifestError(path, f"case_id {case!r} appears on lines {seen[case]} and {line}", line, case,
                                "case_id")
        seen[case] = line
        for column in PATH_COLUMNS:
            if row.get(column):
                file = Path(row[column]).expanduser()
                row[column] = str(file if file.is_absolute() else path.parent / file)
        for column in require:
            if not row.get(column):
                raise ManifestError(path, f"{column} is empty", line, case, column)
        if check:
            _check_row(path, line, row)
    if check and not selected:
        raise ManifestError(path, "has no case" + (f" with split {split!r}" if split is not None else ""))
    return [row for _, row in selected]


def _check_row(path: Path, line: int, row: dict[str, str]) -> None:
    case = row["case_id"]
    try:
        note_for(row)
    except (NoteError, ContradictionError, NoteReadingError) as exc:
        raise ManifestError(path, str(exc), line, case) from None
    if not row.get("ct"):
        raise ManifestError(path, "ct is empty", line, case, "ct")
    for column in PATH_COLUMNS:
        if row.get(column) and not Path(row[column]).exists():
            raise ManifestError(path, f"{column} not found: {row[column]}", line, case, column)


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write rows (keys: MANIFEST_COLUMNS, plus any OPTIONAL_COLUMNS they have) atomically."""
    rows = list(rows)
    columns = MANIFEST_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(c in r for r in rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def merge_manifests(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One manifest of the cases of several (each checked whole: notes parse, files exist), with every
    file path rewritten relative to ``out``'s folder, so two archives (or a phantom set and extra cases
    of a rare kind) train as one. Columns other than MANIFEST_COLUMNS and OPTIONAL_COLUMNS are left out.
    A case id found in two of them is refused, as is an ``out`` that is one of the inputs."""
    out = Path(out)
    if not paths:
        raise ValueError("merge_manifests: give at least one manifest")
    if any(out.resolve() == Path(p).resolve() for p in paths):
        raise ManifestError(out, "is one of the manifests being merged; write the merged one elsewhere")
    rows, origin = [], {}
    for path in paths:
        for row in read_manifest(path, check=True, require=("split",)):
            case = row["case_id"]
            if case in origin:
                raise ManifestError(path, f"case_id {case!r} is also in {origin[case]}", case=case, column="case_id")
            origin[case] = str(path)
            for column in PATH_COLUMNS:
                if row.get(column):
                    row[column] = os.path.relpath(Path(row[column]).resolve(), out.parent.resolve())
            rows.append({k: row[k] for k in MANIFEST_COLUMNS + OPTIONAL_COLUMNS if k in row})
    return write_manifest(out, rows)


def manifest_hash(path: str | os.PathLike) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


# -- training / evaluation view -------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    case_id: str
    ct: Path
    ctv: Path | None
    split: str
    note: ClinicalNote
    regions: Path | None = None
    row: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        return self.note.to_prompt()


def read_cases(path: str | os.PathLike, split: str | None = None, require_ctv: bool = True) -> list[Case]:
    """The checked cases of a manifest (only ``split`` if given) for training and evaluation."""
    require = ("split", "ctv") if require_ctv else ("split",)
    rows = read_manifest(path, split=split, check=True, require=require)
    as_path = lambda value: Path(value) if value else None
    return [Case(row["case_id"], Path(row["ct"]), as_path(row.get("ctv")), row["split"], note_for(row),
                 as_path(row.get("regions")), row) for row in rows]


__all__ = ["MANIFEST_COLUMNS", "OPTIONAL_COLUMNS", "ManifestError", "ManifestNotFoundError", "Case", "note_for",
           "read_manifest", "read_cases", "write_manifest", "merge_manifests", "manifest_hash"]
