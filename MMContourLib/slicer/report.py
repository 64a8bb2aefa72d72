"""What the module shows next to a result, as plain text lines (no Qt, no Slicer, no numpy).

Input is what the worker sends per note (``slicer.worker``): the result's ``summary`` (that of
``inference.contourer.ContourResult.summary``: ``prompt``, ``volume_cc``, ``structures`` = [{"name",
"volume_cc", "expected", "flags"}], ``review`` = {"needs_review", "flags": [{"kind", "structure",
"text"}], "notes"}). The widget (MMContour.py) only puts these lines into its labels.

* :func:`review_panel`: "Needs review" with one line per reason (the structure's name first when the
  reason names one) or "No review flags", then the volume of the CTV and of each structure (cc);
* :func:`compare_structures` / :func:`compare_lines`: Compare notes, per structure: which structures
  appear or disappear from one note to the other and how each volume changes (cc);
* :func:`progress_text`, :func:`outcome_text`, :func:`replace_question`, :func:`parse_variants`: the status
  line while and after a job runs, the question before replacing a chosen segmentation's segments, and
  the Compare notes variants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

NEEDS_REVIEW = "Needs review"
NO_FLAGS = "No review flags"
#: Volume changes smaller than this (cc) read "unchanged": a voxel or two of resampling.
UNCHANGED_CC = 0.05


def _cc(value) -> str:
    return f"{float(value):.1f} cc"


def _signed_cc(value: float) -> str:
    return f"{'+' if value >= 0 else '−'}{abs(value):.1f} cc"


def reason_lines(review: Mapping | None) -> list[str]:
    """One line per review flag, 'structure: why' when it names a structure (``Review.to_dict``)."""
    review = review or {}
    flags = review.get("flags")
    if flags is None:  # only the joined lines (``reasons``): they already start with the structure
        return [str(r) for r in review.get("reasons") or ()]
    return [f"{f['structure']}: {f['text']}" if f.get("structure") else str(f.get("text", "")) for f in flags]


@dataclass(frozen=True)
class ReviewPanel:
    """The review of one result: ``headline`` ("Needs review" / "No review flags"), the reasons, the
    volumes (cc) and what was not checked (``notes``)."""

    headline: str
    reasons: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def needs_review(self) -> bool:
        return self.headline.startswith(NEEDS_REVIEW)

    def lines(self) -> list[str]:
        out = [self.headline, *(f"• {r}" for r in self.reasons)]
        if self.volumes:
            out += ["Volumes:", *(f"  {v}" for v in self.volumes)]
        return out + [f"Not checked: {n}" for n in self.notes]

    def text(self) -> str:
        return "\n".join(self.lines())


def structure_volume_lines(summary: Mapping) -> list[str]:
    """'CTV: 812.4 cc', then each structure drawn or called for by the note; a structure the note calls
    for but the model did not draw says so, one the note does not call for says that too."""
    lines = [f"CTV: {_cc(summary['volume_cc'])}"] if summary.get("volume_cc") is not None else []
    for entry in summary.get("structures") or ():
        drawn, expected = float(entry.get("volume_cc") or 0.0) > 0, bool(entry.get("expected"))
        if not drawn and not expected:
            continue
        suffix = "" if expected else " (the note does not call for it)"
        if not drawn:
            suffix = " (called for by the note, not drawn)"
        lines.append(f"{entry['name']}: {_cc(entry.get('volume_cc') or 0.0)}{suffix}")
    return lines


def review_panel(summary: Mapping | None) -> ReviewPanel:
    """The review shown under one result (see the module docstring for ``summary``)."""
    if not summary:
        return ReviewPanel("No review information: the worker sent no summary (an older MMContour worker?)")
    review = summary.get("review") or {}
    reasons = reason_lines(review)
    needs = bool(review.get("needs_review", bool(reasons)))
    headline = f"{NEEDS_REVIEW} ({len(reasons)} reason{'s' if len(reasons) != 1 else ''})" if needs else NO_FLAGS
    return ReviewPanel(headline, reasons, structure_volume_lines(summary), [str(n) for n in review.get("notes") or ()])


def _volumes(summary: Mapping) -> dict[str, float]:
    return {str(e["name"]): float(e.get("volume_cc") or 0.0) for e in summary.get("structures") or ()}


def compare_structures(first: Mapping, second: Mapping) -> list[str]:
    """How the contour changes from note ``first`` to note ``second`` (their summaries): the CTV's volume
    change, then per structure 'appears (12.0 cc)', 'disappears (was 45.2 cc)' or '610.0 → 580.3 cc
    (−29.7 cc)'; structures neither note drew are left out, unchanged ones say so."""
    lines = []
    if first.get("volume_cc") is not None and second.get("volume_cc") is not None:
        a, b = float(first["volume_cc"]), float(second["volume_cc"])
        lines.append(f"CTV: {_cc(a)} → {_cc(b)} ({_signed_cc(b - a)})")
    va, vb = _volumes(first), _volumes(second)
    if not va and not vb:
        return lines + ["per structure: not available (this bundle draws one CTV, no structures)"]
    for name in [*va, *(n for n in vb if n not in va)]:
        a, b = va.get(name, 0.0), vb.get(name, 0.0)
        if a <= 0 and b <= 0:
            continue
        if a <= 0:
            lines.append(f"{name}: appears ({_cc(b)})")
        elif b <= 0:
            lines.append(f"{name}: disappears (was {_cc(a)})")
        elif abs(b - a) < UNCHANGED_CC:
            lines.append(f"{name}: unchanged ({_cc(a)})")
        else:
            lines.append(f"{name}: {_cc(a)} → {_cc(b)} ({_signed_cc(b - a)})")
    return lines


def compare_lines(summaries: Sequence[Mapping]) -> list[str]:
    """Compare notes: each variant against the first (the current) note, as lines under the result."""
    if len(summaries) < 2:
        return []
    first = summaries[0]
    out = []
    for index, other in enumerate(summaries[1:], start=2):
        out.append(f"'{other.get('prompt') or f'note {index}'}' compared with '{first.get('prompt') or 'note 1'}':")
        out += [f"  {line}" for line in compare_structures(first, other)]
    return out


def result_text(results: Sequence[Mapping]) -> tuple[str, bool]:
    """Everything shown under a finished job and whether it needs review: one result -> its review panel;
    several (Compare notes) -> each note's review headline and reasons, then the per-structure changes."""
    summaries = [r.get("summary") or {} for r in results]
    if len(results) == 1:
        panel = review_panel(summaries[0] or None)
        return panel.text(), panel.needs_review
    lines, needs = [], False
    for index, (result, summary) in enumerate(zip(results, summaries), start=1):
        panel = review_panel(summary or None)
        needs = needs or panel.needs_review
        lines.append(f"{result.get('prompt') or f'note {index}'}: {panel.headline}")
        lines += [f"  • {r}" for r in panel.reasons]
    if all(summaries):
        lines += ["", *compare_lines(summaries)]
    return "\n".join(lines), needs


# -- status line -----------------------------------------------------------------------------------

def progress_text(label: str, stage: str, done: int, total: int, note_index: int, note_count: int,
                  elapsed_s: float) -> str:
    """The status line while a job runs: 'Contouring: window 3/12 (note 1/2)… 4 s'."""
    notes = f" (note {note_index + 1}/{note_count})" if note_count > 1 else ""
    if stage == "windows" and total:
        label = f"Contouring: window {done}/{total}"
    return f"{label}{notes}… {elapsed_s:.0f} s"


def outcome_text(node_name: str, seconds: float, loaded_model: bool | None, segments: int) -> str:
    """The status line of a finished job: which node, how many segments, how long."""
    loaded = " including loading the model" if loaded_model else " (model was already loaded)"
    count = f" ({segments} segment{'s' if segments != 1 else ''})" if segments else ""
    return f"✓ {node_name}{count}: done in {seconds:.1f} s{loaded}"


def replace_question(node_name: str, segment_names: Sequence[str]) -> str:
    """The confirmation asked before a result replaces the segments of a chosen, non-empty segmentation:
    it names every segment that goes (including those the user drew or edited)."""
    listed = ", ".join(segment_names[:12]) + (f" and {len(segment_names) - 12} more" if len(segment_names) > 12 else "")
    return (f"'{node_name}' already holds {len(segment_names)} segment(s): {listed}. Replace all of them with the new "
            "contour? Your edits to them are lost.\n\nChoose Cancel and 'Create new segmentation' as output to keep "
            "them.")


def parse_variants(texts: Sequence[str]) -> tuple[list, str, bool]:
    """Compare notes' variant boxes -> (the notes, the status line, whether every filled box parsed)."""
    from ..note.clinical import ClinicalNote

    notes, problems = [], []
    for index, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            notes.append(ClinicalNote.parse(text))
        except ValueError as exc:
            problems.append(f"variant {index}: {exc}")
    if problems:
        return notes, "✗ " + "\n".join(problems), False
    if notes:
        return notes, f"✓ {len(notes) + 1} notes: the current one and {len(notes)} variant(s)", True
    return notes, "", True


__all__ = ["NEEDS_REVIEW", "NO_FLAGS", "ReviewPanel", "review_panel", "reason_lines", "structure_volume_lines",
           "compare_structures", "compare_lines", "result_text", "progress_text", "outcome_text", "replace_question",
           "parse_variants"]
