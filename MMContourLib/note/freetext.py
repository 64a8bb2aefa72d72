"""Free-text clinical notes and pathology reports -> the structured ClinicalNote, with where each fact came from.

``read_note(text)`` applies rules that know how clinics write (see ``Rules`` below, in their order) and returns a
``NoteReading``: per field the value, the evidence (character spans into the original text and the rule that
decided), the fields it could not decide and the conflicts. A wrong value is far worse than an undecided one, so
every rule abstains when unsure; ``NoteReading.note()`` refuses to build a note from undecided or conflicting fields.

Rules, in order: (1) AJCC 8th: pathologic (pN, ypN, rpN) over stated over clinical (cN) staging; node counts
("5 of 14", "5/14", "two of eleven": 0 -> N0, 1-3 -> N1, 4-9 -> N2, >= 10 -> N3), micrometastases only -> N1mi,
isolated tumour cells only -> N0, negated node statements -> N0; (2) laterality of the current cancer (a remote
history, a normal screening, a benign biopsy or a prophylactic mastectomy of the other breast do not count;
bilateral cancers get per-side facts); (3) surgery vocabulary (note/clinical.py's alias tables; options,
declined and replaced surgeries do not count; a completion mastectomy replaces the lumpectomy); (4) chemotherapy,
age, T, M and histology. Abbreviations: Lt/Rt/L/R (only next to an anatomical or surgical word), BCS, BCT, MRM,
SLNB, ALND, s/p. Typos of the long keywords (one edit) are corrected. Other languages: left/right/bilateral,
mastectomy, breast-conserving surgery, age, sentinel node and breast cancer in German, Spanish and French;
left/right/bilateral, mastectomy, breast-conserving surgery, age and breast cancer in Korean.

What the rules leave open may be scored by a closed-set ``Scorer`` (the frozen LLM, model layer) when one is
given; it is accepted only above ``margin`` and never overrides a rule.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from . import clinical as c
from .freetext_facts import (Evidence, Fact, NoteText, Part, n_category, node_facts, normalise_text, other_facts,
                             split_parts, stage_facts, surgery_facts)

NEEDED = ("side", "n_stage", "surgery")
PER_SIDE = ("n_stage", "surgery", "t_stage")
ALLOWED = {"side": ("left", "right", "both"), "n_stage": c.N_STAGES, "surgery": c.SURGERIES, "t_stage": c.T_STAGES,
           "m_stage": c.M_STAGES, "chemotherapy": c.CHEMOTHERAPIES, "pathology": c.PATHOLOGIES}


class Scorer(Protocol):
    """A closed-set choice: the log-likelihood of each allowed value of ``field`` given the note text."""

    def score(self, text: str, field: str, allowed_values: tuple[str, ...]) -> Mapping[str, float]: ...


class NoteReadingError(ValueError):
    """The note cannot be built: ``.fields`` names the undecided and conflicting fields."""

    def __init__(self, fields: list[str], message: str):
        self.fields = fields
        super().__init__(message)


_BILATERAL = (r"bilateral\s+(?:\w+\s+){0,2}(?:cancers?|carcinomas?|ca|disease|idc|ilc|dcis)(?![a-z])|synchronous|"
              r"bilateral\s*:|both breasts")
_CANCER = r"carcinoma|cancer|(?<![a-z])(?:ca|idc|ilc|dcis)(?![a-z])|tumou?r|malignan|(?<![a-z])(?:yp|p|c)?[tn][0-4is]"


@dataclass
class _Decision:
    value: str | None = None
    evidence: list = field(default_factory=list)
    reason: str = ""          # why undecided
    conflict: list = field(default_factory=list)  # the facts that disagree


def _decide_side(text: NoteText, parts: list[Part], mentions) -> _Decision:
    s = text.s
    votes = []
    for a, b, sides, explicit in mentions:
        part = next((p for p in parts if p.start <= a < p.end), None)
        if not explicit or part is None:
            continue
        group = [p for p in parts if p.sentence == part.sentence and p.attributed == part.attributed]
        normal = any(p.normal for p in group) and not any(re.search(_CANCER, s[p.start:p.end]) and not p.normal
                                                          for p in group)
        if not normal:
            votes.append((a, b, sides, part))
    current = [v for v in votes if not v[3].history] or votes
    voted = frozenset().union(*(v[2] for v in current)) if current else frozenset()
    evidence = [text.evidence(a, b, "laterality") for a, b, _, _ in current]
    marker = [m for m in re.finditer(_BILATERAL, s)
              if not next((p for p in parts if p.start <= m.start() < p.end), Part(0, 0, 0)).normal]
    if marker:
        return _Decision("both", [text.evidence(m.start(), m.end(), "bilateral") for m in marker] + evidence)
    if len(voted) == 1:
        return _Decision(next(iter(voted)), evidence)
    if not voted:
        return _Decision(reason="no side (left, right, bilateral) of a current cancer found")
    with_cancer = {side for side in c.SIDES for p in parts if p.attributed == frozenset({side}) and not p.normal
                   and not p.history and re.search(_CANCER, s[p.start:p.end])}
    if with_cancer == set(c.SIDES):
        return _Decision("both", evidence, )
    return _Decision(reason="both sides are named but only one has cancer facts", conflict=evidence)


def _decide(name: str, facts: list[Fact]) -> _Decision:
    if not facts:
        return _Decision()
    current = [f for f in facts if f.part is None or not f.part.history] or facts
    top = max(f.rank for f in current)
    chosen = [f for f in current if f.rank == top]
    if name == "chemotherapy" and top > 0 and any(f.rank == 0 for f in current):
        chosen = [f for f in current if f.rank >= 0]
    counts = {f.count for f in chosen if f.count}
    if len(counts) > 1:
        total, most = sum(p for p, _, _ in counts), max(p for p, _, _ in counts)
        modifiers = {m for _, _, m in counts}
        category = n_category(total, "") if modifiers == {""} else None
        if category is None or category != n_category(most, ""):
            return _Decision(reason="several node counts that do not add up to one N stage ("
                             + ", ".join(f"{p}/{t}" for p, t, _ in sorted(counts)) + ")")
        for f in chosen:
            if f.count:
                f.value = category
    values = {f.value for f in chosen}
    if name == "pathology":
        if "mixed" in values and values <= {"mixed", "IDC", "ILC"}:
            values = {"mixed"}
        if len(values) > 1:
            values.discard("DCIS")  # an invasive cancer with an in-situ component
    if len(values) == 1:
        value = next(iter(values))
        return _Decision(value, [f.evidence for f in chosen if f.value == value or name == "pathology"])
    return _Decision(conflict=[f.evidence for f in chosen])


@dataclass
class NoteReading:
    """What ``read_note`` found. ``values`` holds the decided fields (per-side fields of a bilateral note as
    ``n_stage.left``); ``evidence`` the spans per field; ``unresolved`` the fields it could not decide and
    ``conflicts`` the fields the text states twice with different values."""

    text: str
    values: dict[str, str]
    evidence: dict[str, list[Evidence]]
    unresolved: list[str]
    conflicts: list[dict]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def sides(self) -> tuple[str, ...]:
        side = self.values.get("side")
        return c.SIDES if side == "both" else (side,) if side else ()

    def keys(self, name: str) -> tuple[str, ...]:
        """The keys that hold ``name``: ``n_stage.left``, ``n_stage.right`` for a bilateral note."""
        return tuple(f"{name}.{s}" for s in c.SIDES) if name in PER_SIDE and self.sides == c.SIDES else (name,)

    @property
    def fields(self) -> dict[str, str]:
        """Flat string form as ClinicalNote.to_fields writes it; '' where not stated or undecided."""
        out = {}
        for name in c.FIELDS:
            keys = self.keys(name)
            values = [self.values.get(k, "") for k in keys]
            if len(keys) == 1 or len(set(values)) == 1:
                out[name] = values[0]
            elif all(values) or name == "t_stage":
                out[name] = ";".join(f"{k.split('.')[1]}:{v}" for k, v in zip(keys, values))
            else:
                out[name] = ""
        return out

    def blocking(self) -> list[str]:
        needed = [k for name in NEEDED for k in self.keys(name)]
        return [k for k in needed if k in self.unresolved] + [x["field"] for x in self.conflicts]

    @property
    def complete(self) -> bool:
        """All fields needed for a prompt are decided and nothing conflicts."""
        return not self.blocking()

    def note(self) -> c.ClinicalNote:
        problems = self.blocking()
        if problems:
            lines = [f"{k}: {self.reasons.get(k) or 'not found in the note'}" for k in problems
                     if k in self.unresolved]
            lines += [f"{x['field']}: the note says " + " and ".join(repr(e["text"]) for e in x["evidence"])
                      if x["evidence"] else f"{x['field']}: {x.get('message', '')}" for x in self.conflicts]
            raise NoteReadingError(problems, "cannot build the clinical note from this text; state or correct "
                                   "these fields: " + "; ".join(lines))
        return c.ClinicalNote.from_fields(**self.fields)

    def prompt(self) -> str:
        return self.note().to_prompt()

    def to_json(self) -> dict:
        return {"prompt": self.prompt() if self.complete else None, "fields": self.fields,
                "evidence": {k: [e.to_dict() for e in v] for k, v in self.evidence.items()},
                "unresolved": list(self.unresolved), "conflicts": list(self.conflicts)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, indent=2)


def read_note(text: str, scorer: Scorer | None = None, margin: float = 2.0) -> NoteReading:
    """Read a free-text note. ``scorer`` (optional) decides what the rules leave unresolved when its best
    value beats the second by at least ``margin`` (log-likelihood); its decisions carry the rule 'llm'."""
    t = normalise_text(str(text))
    parts, mentions = split_parts(t)

    def locate(i):
        return next((p for p in parts if p.start <= i < p.end), None)

    stages, after_neoadjuvant = stage_facts(t, locate)
    facts = stages + node_facts(t, parts, locate) + surgery_facts(t, locate) + other_facts(t, locate)
    if after_neoadjuvant:
        facts += [Fact("chemotherapy", "neoadjuvant", 2, Evidence(f.evidence.start, f.evidence.end, f.evidence.text,
                                                                   "post-neoadjuvant stage"), f.part)
                  for f in stages if f.evidence.rule == "post-neoadjuvant stage"]
    side = _decide_side(t, parts, mentions)
    if side.value is None and scorer is not None:
        side = _scored(scorer, str(text), "side", margin) or side
    reading = _assemble(str(text), facts, side)
    if scorer is not None:
        for key in list(reading.unresolved):
            decision = _scored(scorer, str(text), key, margin)
            if decision is not None:
                reading.unresolved.remove(key)
                reading.values[key] = decision.value
                reading.evidence[key] = decision.evidence
    if not reading.blocking():
        try:
            c.ClinicalNote.from_fields(**{k: v for k, v in reading.fields.items()})
        except (c.ContradictionError, c.NoteError) as error:
            reading.conflicts.append({"field": getattr(error, "field", "note"), "values": [], "evidence": [],
                                      "message": str(error)})
    return reading


def _assemble(text: str, facts: list[Fact], side: _Decision) -> NoteReading:
    values, evidence, unresolved, conflicts, reasons = {}, {}, [], [], {}

    def record(key: str, decision: _Decision, needed: bool):
        if decision.conflict:
            conflicts.append({"field": key, "values": sorted({e.text for e in decision.conflict}),
                              "evidence": [e.to_dict() for e in decision.conflict]})
        elif decision.value is not None:
            values[key], evidence[key] = decision.value, decision.evidence
        elif needed or decision.reason:
            unresolved.append(key)
            reasons[key] = decision.reason
        if decision.reason:
            reasons[key] = decision.reason

    record("side", side, True)
    sides = c.SIDES if side.value == "both" else (side.value,) if side.value else (None,)

    def belongs(f: Fact, target: str | None, strict: bool) -> bool:
        if target is None or f.part is None or f.part.attributed is None:
            return not strict or target is None
        return target in f.part.attributed

    bilateral = len(sides) == 2
    for name in PER_SIDE:
        for target in sides:
            key = f"{name}.{target}" if bilateral else name
            found = [f for f in facts if f.field == name and belongs(f, target, bilateral)]
            named = {f.part.attributed for f in found if f.part is not None and f.part.attributed}
            if target is None and len(frozenset().union(*named)) > 1 and len({f.value for f in found}) > 1:
                record(key, _Decision(reason=f"the note gives {name} for both sides but its side is undecided"),
                       True)
                continue
            record(key, _decide(name, found), name in NEEDED)
    for name in ("age", "m_stage", "chemotherapy", "pathology"):
        if name == "pathology" and bilateral:
            per = [_decide(name, [f for f in facts if f.field == name and belongs(f, s, False)]) for s in sides]
            if all(d.value == per[0].value and not d.conflict for d in per):
                record(name, _Decision(per[0].value, per[0].evidence + per[1].evidence), False)
            else:
                record(name, _Decision(conflict=[e for d in per for e in (d.evidence or d.conflict)]), False)
            continue
        found = [f for f in facts if f.field == name and belongs(f, sides[0] if not bilateral else None, False)]
        record(name, _decide(name, found), False)
    return NoteReading(text, values, evidence, unresolved, conflicts, reasons)


def _scored(scorer: Scorer, text: str, key: str, margin: float) -> _Decision | None:
    allowed = tuple(ALLOWED[key.split(".")[0]])
    scores = scorer.score(text, key, allowed)
    ranked = sorted(((float(scores[v]), v) for v in allowed if v in scores), reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0][0] - ranked[1][0] < margin):
        return None
    return _Decision(ranked[0][1], [Evidence(0, len(text), text, "llm")])


__all__ = ["read_note", "NoteReading", "NoteReadingError", "Evidence", "Scorer", "NEEDED", "ALLOWED"]
