#!/usr/bin/env python3
"""How well ``read_note`` reads the synthetic note set: right, wrong and undecided fields.

Usage: ``python3 bench/read_note_accuracy.py [Testing/data/free_text_notes.jsonl] [-v]``. Each line of the set
holds a note's ``text`` and its ``expected`` fields (ClinicalNote.to_fields form; '' = not stated, null = the
note does not decide it, so reading must leave it undecided). A field is right when the reading gives the
expected value, undecided when it gives none (or '' for a stated value), wrong otherwise. ``-v`` lists the misses.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MMContourLib.note.freetext import read_note  # noqa: E402

SET = ROOT / "Testing" / "data" / "free_text_notes.jsonl"


def score(path: Path = SET) -> dict:
    totals = {"notes": 0, "fields": 0, "right": 0, "wrong": 0, "undecided": 0, "misses": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        reading = read_note(case["text"])
        blocked = set(reading.unresolved) | {x["field"] for x in reading.conflicts}
        totals["notes"] += 1
        for name, expected in case["expected"].items():
            undecided = any(k == name or k.startswith(name + ".") for k in blocked)
            got = None if undecided else (reading.fields[name] or None)
            totals["fields"] += 1
            if got == (expected or None):
                totals["right"] += 1
                continue
            kind = "undecided" if got is None else "wrong"
            totals[kind] += 1
            totals["misses"].append((kind, case["id"], name, expected, got))
    totals["accuracy"] = totals["right"] / max(1, totals["fields"])
    return totals


def main(argv: list[str]) -> int:
    paths = [a for a in argv if not a.startswith("-")]
    totals = score(Path(paths[0]) if paths else SET)
    print(f"{totals['notes']} notes, {totals['fields']} fields: {totals['right']} right "
          f"({100 * totals['accuracy']:.1f} %), {totals['wrong']} wrong, {totals['undecided']} undecided")
    if "-v" in argv:
        for kind, case, name, expected, got in totals["misses"]:
            print(f"  {kind:9} {case} {name}: expected {expected!r}, read {got!r}")
    return 0 if totals["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
