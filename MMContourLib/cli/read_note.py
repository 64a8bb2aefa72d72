"""``mmcontour read-note``: free text (a consult note, a pathology report) -> the structured note, showing per
field the value, where in the text it came from and which rule decided, what is undecided, and the prompt."""
from __future__ import annotations

import json
from pathlib import Path

from .common import note_text

#: Exit status when a field needed for the prompt is undecided or conflicting (as a refused input).
INCOMPLETE = 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "read-note", help="read a free-text clinical note: the structured note, with evidence per field",
        description="Reads a free-text note or pathology report and prints the structured note it derived: per "
                    "field the value, the character span(s) it came from and the rule that decided, the fields "
                    "it could not decide, and the prompt it would use. Exit 0 when side, N stage and surgery "
                    "are all decided, 2 otherwise (never a guess: state the fields it names).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the note's text")
    source.add_argument("--file", type=Path, help="a UTF-8 text file holding the note")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt", "fields", "evidence", "unresolved", "conflicts"} as JSON')
    p.add_argument("--llm", metavar="SOURCE",
                   help="also let this causal LLM (folder, .gguf or pkg:...) choose, among the allowed values, what "
                        "the rules leave undecided; off by default (docs/method.md: a small LLM is not reliable)")
    p.add_argument("--margin", type=float, default=2.0,
                   help="with --llm: accept its choice only when it beats the runner-up by this many nats "
                        "(default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..note.freetext import read_note

    scorer = None
    if args.llm:
        from ..model.note_scorer import LLMChoiceScorer
        from ..model.text import TextEncoderSpec, build_text_encoder

        scorer = LLMChoiceScorer.from_text_encoder(build_text_encoder(TextEncoderSpec(kind="causal-lm",
                                                                                      source=args.llm)))
    reading = read_note(note_text(args.text, args.file), scorer=scorer, margin=args.margin)
    if args.json:
        print(json.dumps(reading.to_json(), ensure_ascii=False, indent=2))
    else:
        print(describe(reading))
    return 0 if reading.complete else INCOMPLETE


def describe(reading) -> str:
    """The reading for a person: one line per field with its evidence, then what is left and the prompt."""
    lines = ["fields:"]
    fields = reading.fields
    for name, value in fields.items():
        keys = [k for k in reading.evidence if k == name or k.startswith(name + ".")]
        spans = "; ".join(f"{e.start}-{e.end} {e.text!r} ({e.rule})" for k in keys for e in reading.evidence[k])
        shown = value or ("undecided" if any(k.split(".")[0] == name for k in reading.unresolved) else "-")
        lines.append(f"  {name:<13} {shown:<24} {spans}".rstrip())
    for key in reading.unresolved:
        lines.append(f"undecided: {key}" + (f" ({reading.reasons[key]})" if reading.reasons.get(key) else ""))
    for conflict in reading.conflicts:
        said = " and ".join(repr(e["text"]) for e in conflict.get("evidence", [])) or conflict.get("message", "")
        lines.append(f"conflicting: {conflict['field']}: the note says {said}")
    if reading.complete:
        lines.append(f"prompt: {reading.prompt()}")
    else:
        lines.append("prompt: none until the fields above are stated (exit status 2); give them as --side / --n / "
                     "--surgery or correct the note")
    return "\n".join(lines)
