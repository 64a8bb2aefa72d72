"""The clinical note: the structured facts that decide a breast CTV, and the prompt the LLM reads.

Fields follow paper Table 5 (age, location, T, N, M, surgery, chemotherapy, pathology).
A bilateral case carries its own T stage, N stage and surgery for each side.

Flat string form (used by the manifest CSV, the CLI and the Slicer form): every field is a
string; for ``side=both`` the per-side fields are written ``left:N0;right:N2``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

#: How a note becomes what the LLM reads, by version; a bundle records the version it was trained with
#: and is read the same way. Add a version when the wording of ``to_prompt`` or the reading changes.
PROMPT_TEMPLATES = {
    "table5-v1": "the whole note is read at once: one set of context tokens",
    "table5-v2": "each side's part of a bilateral note is read on its own: one set of context tokens per side",
}
PROMPT_TEMPLATE_VERSION = "table5-v2"  # what new bundles are trained with
CLAUSE_SEPARATOR = "; "  # between the sides' parts of a bilateral prompt (and of a note in the prompt's form)


def check_prompt_template(template: str) -> str:
    """``template`` if it is one of PROMPT_TEMPLATES; else a ValueError naming the known ones."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(PROMPT_TEMPLATES)}")
    return template


def prompt_clauses(prompt: str, template: str = PROMPT_TEMPLATE_VERSION) -> list[str]:
    """The texts the LLM reads for ``prompt`` under ``template``: the whole prompt (table5-v1), or each
    side's part of it on its own (table5-v2; a unilateral prompt has one part)."""
    if check_prompt_template(template) == "table5-v1":
        return [prompt]
    return [c.strip() for c in _side_parts(prompt) if c.strip()] or [prompt]


def _side_parts(text: str) -> list[str]:
    """A note or prompt in the prompt's form, cut at CLAUSE_SEPARATOR into its sides' parts."""
    return str(text).split(CLAUSE_SEPARATOR.strip())

SIDES = ("left", "right")


def other_side(side: str) -> str:
    """"left" <-> "right"."""
    if side not in SIDES:
        raise ValueError(f"other_side: {side!r} is not one side")
    return "right" if side == "left" else "left"


N_STAGES = ("N0", "N1mi", "N1", "N2", "N3")
T_STAGES = ("Tis", "T0", "T1mi", "T1a", "T1b", "T1c", "T1", "T2", "T3", "T4a", "T4b", "T4c", "T4d", "T4", "TX")
M_STAGES = ("M0", "M1", "MX")
SURGERIES = ("bcs", "mastectomy")
CHEMOTHERAPIES = ("none", "adjuvant", "neoadjuvant")
PATHOLOGIES = ("IDC", "ILC", "DCIS", "mixed", "mucinous", "tubular", "medullary", "metaplastic", "other")
SURGERY_PROMPT = {"bcs": "breast conserving surgery", "mastectomy": "total mastectomy surgery"}
FIELDS = ("age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology")


class NoteError(ValueError):
    """A clinical-note value that cannot be used; the message names the field and what is accepted."""

    def __init__(self, field: str, value: object, accepted: str):
        self.field, self.value = field, value
        super().__init__(f"clinical note field '{field}': cannot use {value!r}. Accepted: {accepted}.")


class ContradictionError(ValueError):
    """Fields that are valid alone but cannot all be true of one patient."""


def _key(value: object) -> str:
    return re.sub(r"[\s_\-.]+", " ", str(value).strip().lower()).strip()


#: Words of other languages clinics write (German, Spanish, French, Korean); free-text reading uses them too.
_FOREIGN = {
    "left": ("links", "linke", "linken", "linker", "linksseitig", "izquierda", "izquierdo", "gauche", "좌측", "왼쪽"),
    "right": ("rechts", "rechte", "rechten", "rechter", "rechtsseitig", "derecha", "derecho", "droite", "droit",
              "우측", "오른쪽"),
    "both": ("beidseits", "beidseitig", "양측"),
    "bcs": ("brusterhaltende operation", "brusterhaltende therapie", "cirugía conservadora", "cirugia conservadora",
            "tumorectomía", "tumorectomia", "cuadrantectomía", "cuadrantectomia", "chirurgie conservatrice",
            "tumorectomie", "유방보존술", "유방보존수술", "부분절제술"),
    "mastectomy": ("mastektomie", "ablatio mammae", "mastectomía", "mastectomia", "mastectomie", "유방전절제술",
                   "유방절제술", "전절제술"),
}
_SIDE_ALIASES = {
    "left": ("l", "lt", "left", "left breast", "lt breast", "l breast", "left side", "sin", "sinister",
             *_FOREIGN["left"]),
    "right": ("r", "rt", "right", "right breast", "rt breast", "r breast", "right side", "dex", "dexter",
              *_FOREIGN["right"]),
    "both": ("both", "b", "bil", "bilateral", "both breasts", "both sides", "left and right", "lt rt", "l r",
             *_FOREIGN["both"]),
}
_SURGERY_ALIASES = {
    "bcs": ("bcs", "breast conserving", "breast conserving surgery", "breast conservation", "partial mastectomy",
            "lumpectomy", "wide local excision", "wle", "quadrantectomy", "segmentectomy", "segmental mastectomy",
            "bct", "breast conserving therapy", "breast conservation surgery", "breast conservation therapy",
            *_FOREIGN["bcs"]),
    "mastectomy": ("mastectomy", "total", "total mastectomy", "total mastectomy surgery", "tm", "simple mastectomy",
                   "modified radical mastectomy", "mrm", "radical mastectomy", "skin sparing mastectomy",
                   "nipple sparing mastectomy", "ssm", "nsm", *_FOREIGN["mastectomy"]),
}
_CHEMO_ALIASES = {
    "none": ("none", "no", "n", "nil", "0", "no chemotherapy", "no chemo", "-"),
    "adjuvant": ("adjuvant", "adj", "adjuvant chemotherapy", "postoperative", "post operative", "act"),
    "neoadjuvant": ("neoadjuvant", "neo", "neoadj", "nac", "nact", "neoadjuvant chemotherapy", "preoperative",
                    "pre operative", "primary systemic therapy"),
}
_PATHOLOGY_ALIASES = {
    "IDC": ("idc", "invasive ductal carcinoma", "ductal", "nst", "idc nst", "invasive carcinoma nst",
            "invasive breast carcinoma of no special type"),
    "ILC": ("ilc", "invasive lobular carcinoma", "lobular"),
    "DCIS": ("dcis", "ductal carcinoma in situ"),
    "mixed": ("mixed", "mixed ductal lobular", "idc ilc", "idc+ilc"),
    "mucinous": ("mucinous", "colloid"),
    "tubular": ("tubular",),
    "medullary": ("medullary",),
    "metaplastic": ("metaplastic",),
    "other": ("other", "others", "unknown"),
}


def _lookup(field: str, value: object, aliases: Mapping[str, tuple[str, ...]]) -> str:
    key = _key(value)
    for canonical, names in aliases.items():
        if key in names or key == _key(canonical):
            return canonical
    raise NoteError(field, value, ", ".join(aliases))


def normalise_side(value: object) -> str:
    return _lookup("side", value, _SIDE_ALIASES)


def normalise_surgery(value: object) -> str:
    return _lookup("surgery", value, _SURGERY_ALIASES)


def normalise_chemotherapy(value: object) -> str:
    return _lookup("chemotherapy", value, _CHEMO_ALIASES)


def normalise_pathology(value: object) -> str:
    return _lookup("pathology", value, _PATHOLOGY_ALIASES)


_PREFIX = r"(?P<prefix>yp|rp|yc|c|p|y|r|a)?"


def _stage_match(letter: str, value: object) -> tuple[str, re.Match | None]:
    text = re.sub(r"\s+", "", str(value).strip())
    if re.match(r"^(\d|is$|x$)", text, flags=re.IGNORECASE):  # '1mi' -> 'N1mi', 'is' -> 'Tis'
        text = letter + text
    return text, re.fullmatch(_PREFIX + letter + r"(?P<rest>.+)", text, flags=re.IGNORECASE)


def normalise_n_stage(value: object) -> str:
    """``1mi``, ``N1mi``, ``pN1(mi)``, ``pN1a``, ``ypN2``, ``cN0(i+)`` -> one of N_STAGES."""
    accepted = ", ".join(N_STAGES) + " (with c/p/yp prefixes and a/b/c, (mi), (i+), (sn) suffixes)"
    text, m = _stage_match("N", value)
    if m is None:
        raise NoteError("n_stage", value, accepted)
    rest = m.group("rest").lower().replace("(", "").replace(")", "")
    rest = re.sub(r"sn$|f$", "", rest)
    if rest in ("x",):
        raise NoteError("n_stage", value, accepted + "; NX cannot decide whether nodes are treated: give the stage")
    found = re.fullmatch(r"([0-3])(mi|i\+|i-|mol\+|mol-|[abc])?", rest)
    if not found:
        raise NoteError("n_stage", value, accepted)
    number, suffix = found.groups()
    if number == "1" and suffix == "mi":
        return "N1mi"
    if suffix == "mi" or (number == "0" and suffix in ("a", "b", "c")):
        raise NoteError("n_stage", value, accepted)
    return "N" + number


def n_stage_prefix(value: object) -> str:
    """The classification prefix a clinic wrote ('c', 'p', 'yp', ...), lower case; '' if none."""
    _, m = _stage_match("N", value)
    return (m.group("prefix") or "").lower() if m else ""


def normalise_t_stage(value: object) -> str:
    accepted = ", ".join(T_STAGES) + " (with c/p/yp prefixes)"
    text, m = _stage_match("T", value)
    if m is None:
        raise NoteError("t_stage", value, accepted)
    rest = m.group("rest").lower()
    table = {t[1:].lower(): t for t in T_STAGES}
    if rest not in table:
        raise NoteError("t_stage", value, accepted)
    return table[rest]


def normalise_m_stage(value: object) -> str:
    accepted = ", ".join(M_STAGES)
    text, m = _stage_match("M", value)
    if m is None:
        raise NoteError("m_stage", value, accepted)
    rest = m.group("rest").lower().replace("(", "").replace(")", "")
    if rest in ("0", "0i+"):
        return "M0"
    if rest in ("1", "1a", "1b", "1c"):
        return "M1"
    if rest == "x":
        return "MX"
    raise NoteError("m_stage", value, accepted)


def normalise_age(value: object) -> int | None:
    if value is None or _key(value) in ("", "unknown", "na", "nan"):
        return None
    try:
        age = float(str(value).strip().lower().removesuffix("y").removesuffix("yo").removesuffix("years").strip())
    except ValueError:
        raise NoteError("age", value, "a whole number of years, 0-120") from None
    if not (0 <= age <= 120) or age != int(age):
        raise NoteError("age", value, "a whole number of years, 0-120")
    return int(age)


@dataclass(frozen=True)
class SideFindings:
    """What one treated breast needs: its side, T stage, N stage and surgery."""

    side: str
    n_stage: str
    surgery: str
    t_stage: str = ""

    def __post_init__(self):
        object.__setattr__(self, "side", _lookup("side", self.side, {s: _SIDE_ALIASES[s] for s in SIDES}))
        object.__setattr__(self, "n_stage", normalise_n_stage(self.n_stage))
        object.__setattr__(self, "surgery", normalise_surgery(self.surgery))
        if self.t_stage not in ("", None):
            object.__setattr__(self, "t_stage", normalise_t_stage(self.t_stage))
        else:
            object.__setattr__(self, "t_stage", "")

    @property
    def node_positive(self) -> bool:
        """Regional nodal irradiation is indicated (N1 or more; N1mi is treated as N0, docs/method.md)."""
        return self.n_stage in ("N1", "N2", "N3")

    def to_prompt(self) -> str:
        return f"{self.n_stage}, {SURGERY_PROMPT[self.surgery]}, {self.side} side"


@dataclass(frozen=True)
class ClinicalNote:
    """A patient's clinical note. ``sides`` holds one entry per treated breast, left before right."""

    sides: tuple[SideFindings, ...]
    age: int | None = None
    m_stage: str = ""
    chemotherapy: str = ""
    pathology: str = ""

    def __post_init__(self):
        sides = tuple(sorted(self.sides, key=lambda s: SIDES.index(s.side)))
        if not sides:
            raise NoteError("side", "", "left, right, both")
        if len({s.side for s in sides}) != len(sides):
            raise ContradictionError(f"the note describes the {sides[0].side} side twice")
        object.__setattr__(self, "sides", sides)
        object.__setattr__(self, "age", normalise_age(self.age))
        for name, fn in (("m_stage", normalise_m_stage), ("chemotherapy", normalise_chemotherapy),
                         ("pathology", normalise_pathology)):
            value = getattr(self, name)
            object.__setattr__(self, name, "" if value in ("", None) else fn(value))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_fields(cls, side, n_stage, surgery, t_stage="", age=None, m_stage="", chemotherapy="",
                    pathology="") -> "ClinicalNote":
        """Build from flat values as a clinic writes them. For ``side=both``, ``n_stage``,
        ``surgery`` and ``t_stage`` may be per side (``left:N0;right:N2``) or one value for both."""
        side_value = normalise_side(side)
        targets = SIDES if side_value == "both" else (side_value,)
        per_side = {name: _split_per_side(name, value, targets)
                    for name, value in (("n_stage", n_stage), ("surgery", surgery), ("t_stage", t_stage))}
        raw_n = per_side["n_stage"]
        sides = tuple(SideFindings(s, per_side["n_stage"][s], per_side["surgery"][s], per_side["t_stage"][s])
                      for s in targets)
        note = cls(sides=sides, age=age, m_stage=m_stage, chemotherapy=chemotherapy, pathology=pathology)
        note._check_consistency({s: n_stage_prefix(raw_n[s]) for s in targets},
                                {s: per_side["t_stage"][s] for s in targets})
        return note

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> "ClinicalNote":
        """From a manifest / clinical-table row (the keys of FIELDS; extra keys are ignored)."""
        missing = [k for k in ("side", "n_stage", "surgery") if _key(row.get(k, "")) in ("", "nan")]
        if missing:
            raise NoteError(missing[0], row.get(missing[0], ""), "a value is required")
        values = {k: ("" if _key(row.get(k, "")) in ("", "nan") else row[k]) for k in FIELDS if k in row}
        return cls.from_fields(**values)

    @classmethod
    def parse(cls, text: str) -> "ClinicalNote":
        """Parse a free-text note in the prompt's own form, e.g. ``N1mi, BCS, left side`` or the
        bilateral ``N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side``.
        Extra comma-separated facts (``cT2``, ``age 61``, ``M0``, ``IDC``, ``adjuvant``) are accepted."""
        if not str(text).strip():
            raise NoteError("note", text, "a note such as 'N1, breast conserving surgery, left side'")
        common: dict[str, object] = {}
        sides: list[dict[str, str]] = []
        for part in _side_parts(text):
            facts: dict[str, str] = {}
            for token in (t.strip() for t in part.split(",")):
                if not token:
                    continue
                name, value = _classify(token)
                target = facts if name in ("side", "n_stage", "surgery", "t_stage") else common
                if name in target and target[name] != value:
                    raise ContradictionError(f"the note gives two values for {name}: {target[name]!r} and {value!r}")
                target[name] = value
            if facts:
                sides.append(facts)
        for facts in sides:
            for need in ("side", "n_stage", "surgery"):
                if need not in facts:
                    raise NoteError(need, "", f"the note '{part.strip() or text}' must state {need.replace('_', ' ')}")
        if len(sides) == 1:
            return cls.from_fields(**sides[0], **common)
        if {normalise_side(f["side"]) for f in sides} != set(SIDES) or len(sides) != 2:
            raise ContradictionError(f"a bilateral note needs one part for the left and one for the right side: {text!r}")
        per = {k: ";".join(f"{normalise_side(f['side'])}:{f.get(k, '')}" for f in sides)
               for k in ("n_stage", "surgery", "t_stage")}
        return cls.from_fields(side="both", **per, **common)

    # -- derived ------------------------------------------------------------------------------
    @property
    def side(self) -> str:
        return self.sides[0].side if len(self.sides) == 1 else "both"

    def findings(self, side: str) -> SideFindings | None:
        return next((s for s in self.sides if s.side == side), None)

    def to_prompt(self) -> str:
        """The exact text the LLM reads (paper Table 5); see PROMPT_TEMPLATE_VERSION."""
        return CLAUSE_SEPARATOR.join(s.to_prompt() for s in self.sides)

    def to_fields(self) -> dict[str, str]:
        """Flat string form (manifest row / form widgets); ``from_fields(**to_fields())`` round-trips."""
        def per(name):
            values = [getattr(s, name) for s in self.sides]
            if len(self.sides) == 1 or len(set(values)) == 1:
                return values[0]
            return ";".join(f"{s.side}:{getattr(s, name)}" for s in self.sides)

        return {"age": "" if self.age is None else str(self.age), "side": self.side, "t_stage": per("t_stage"),
                "n_stage": per("n_stage"), "m_stage": self.m_stage, "surgery": per("surgery"),
                "chemotherapy": self.chemotherapy, "pathology": self.pathology}

    def replace(self, **fields) -> "ClinicalNote":
        """A copy with some flat fields changed (e.g. ``side='right'`` or ``n_stage='N0'``)."""
        values = self.to_fields()
        if "side" in fields and normalise_side(fields["side"]) != self.side:
            if self.side == "both" or normalise_side(fields["side"]) == "both":
                for name in ("n_stage", "surgery", "t_stage"):
                    if ";" in values[name] and name not in fields:
                        raise ContradictionError(f"changing side from both needs a single {name}")
        values.update(fields)
        return ClinicalNote.from_fields(**values)

    def _check_consistency(self, prefixes: Mapping[str, str], t_stages: Mapping[str, str]) -> None:
        if any(p.startswith("y") for p in prefixes.values()) and self.chemotherapy in ("none", "adjuvant"):
            raise ContradictionError(
                f"a yp/yc stage means staging after neoadjuvant therapy, but chemotherapy is '{self.chemotherapy}'")
        for s in self.sides:
            if s.t_stage == "Tis" and self.pathology not in ("", "DCIS"):
                raise ContradictionError(f"T stage Tis (in situ) contradicts invasive pathology {self.pathology}")
        if self.pathology == "DCIS" and any(s.t_stage not in ("", "Tis") for s in self.sides):
            raise ContradictionError("pathology DCIS (in situ) needs T stage Tis")


def _split_per_side(name: str, value: object, targets: tuple[str, ...]) -> dict[str, str]:
    text = "" if value is None else str(value).strip()
    if ":" not in text and "/" not in text:
        return {s: text for s in targets}
    if ":" in text:
        parts = {}
        for piece in re.split(r"[;,]", text):
            if not piece.strip():
                continue
            if ":" not in piece:
                raise NoteError(name, value, "one value, or per side as 'left:VALUE;right:VALUE'")
            side, v = piece.split(":", 1)
            parts[normalise_side(side)] = v.strip()
    else:  # 'N0/N2' means left/right
        pieces = [p.strip() for p in text.split("/")]
        if len(pieces) != 2:
            raise NoteError(name, value, "one value, or per side as 'left:VALUE;right:VALUE'")
        parts = dict(zip(SIDES, pieces))
    if set(parts) - set(targets):
        extra = sorted(set(parts) - set(targets))
        raise ContradictionError(f"{name} is given for the {extra[0]} side, but the note's side is {'/'.join(targets)}")
    missing = [s for s in targets if s not in parts]
    if missing and name != "t_stage":
        raise NoteError(name, value, f"a value for each treated side ({', '.join(targets)})")
    return {s: parts.get(s, "") for s in targets}


def _classify(token: str) -> tuple[str, str]:
    """Which field a free-text token states."""
    low = _key(token)
    side_words = low.removesuffix(" side").removesuffix(" breast")
    for name, fn in (("side", normalise_side), ("surgery", normalise_surgery),
                     ("chemotherapy", normalise_chemotherapy), ("pathology", normalise_pathology)):
        for candidate in (low, side_words) if name == "side" else (low,):
            try:
                fn(candidate)
                return name, token
            except NoteError:
                pass
    m = re.fullmatch(r"(?:age\s*)?(\d{1,3})\s*(?:y|yo|years?|years old)?", low)
    if m:
        return "age", m.group(1)
    compact = token.replace(" ", "")
    for name, fn in (("n_stage", normalise_n_stage), ("t_stage", normalise_t_stage), ("m_stage", normalise_m_stage)):
        if re.match(r"^(yp|rp|yc|c|p|y|r|a)?" + name[0], compact, re.IGNORECASE):
            fn(compact)  # raises a NoteError naming the field
            return name, compact
    raise NoteError("note", token, "comma-separated facts: N stage, surgery, side (and optionally T, M, age, "
                    "chemotherapy, pathology), e.g. 'N1mi, breast conserving surgery, left side'")


_NORMALISERS = {"age": normalise_age, "side": normalise_side, "t_stage": normalise_t_stage,
                "n_stage": normalise_n_stage, "m_stage": normalise_m_stage, "surgery": normalise_surgery,
                "chemotherapy": normalise_chemotherapy, "pathology": normalise_pathology}


def _normalised(name: str, value: object, sides: tuple[str, ...]) -> object:
    if name in ("n_stage", "surgery", "t_stage"):
        per = _split_per_side(name, value, sides)
        return {s: _NORMALISERS[name](v) if v else "" for s, v in per.items()}
    return _NORMALISERS[name](value)


def _given(fields: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if k in FIELDS and v is not None and _key(v) not in ("", "nan")}


def _check_agree(stated: Mapping[str, object], given: Mapping[str, object], sides: tuple[str, ...],
                 text_name: str, field_name: "str | Mapping[str, str]") -> None:
    """ContradictionError (``.field``, ``.values``) for the first fact stated in both with different values."""
    for name, value in sorted(given.items(), key=lambda item: item[0] != "side"):  # side first: it splits the rest
        if name in stated and _normalised(name, stated[name], sides) != _normalised(name, value, sides):
            where = field_name.get(name, name) if isinstance(field_name, Mapping) else field_name.format(name)
            error = ContradictionError(
                f"{name} is stated twice with different values: {stated[name]!r} in {text_name} and {value!r} in "
                f"{where}; correct one of them, or leave one out")
            error.field, error.values = name, (stated[name], value)
            raise error


def note_from_parts(text: str | None, fields: Mapping[str, object], *, text_name: str = "the note",
                    field_name: "str | Mapping[str, str]" = "the {} field", reader=None) -> ClinicalNote:
    """One note from a free-text part (a prompt-style note ``ClinicalNote.parse`` reads, e.g. ``N1, BCS, left``)
    and structured fields (FIELDS keys; other keys, None, '' and 'nan' are ignored): a fact stated in one place
    is taken from there; stated in both, the normalised values must be equal, else ContradictionError with
    ``.field`` and ``.values`` (text's, field's). ``text_name`` / ``field_name`` word the message for the
    caller ("the 'note' column", "--side"; ``field_name`` may map each field to its own words).
    ``reader`` (``note.freetext.read_note``; passed in, this module may not import it) reads a text that is
    not in the prompt's form, under the same rule (``note_from_reading``)."""
    given = _given(fields)
    if text is None or not str(text).strip():
        return ClinicalNote.from_row(given)
    text = str(text)
    bilateral = len(_side_parts(text)) > 1
    original = text

    def token(name: str) -> str:
        """A structured value as one more fact of a single-part text, so that parse checks it with the rest."""
        value = given[name]
        if re.search(r"[,;:/]", str(value)) or (bilateral and name in ("side", "n_stage", "surgery", "t_stage")):
            return ""
        return str(_NORMALISERS[name](value) or "")

    added: set[str] = set()
    while True:
        try:
            note = ClinicalNote.parse(text)
            break
        except NoteError as error:  # the text leaves a needed fact (side, N, surgery) to the fields
            if reader is not None and error.value != "" and not added:  # a phrase that is no prompt fact
                return note_from_reading(reader(original), given, text_name=text_name, field_name=field_name)
            if error.value != "" or error.field not in given or error.field in added or not token(error.field):
                raise
            text = f"{text}, {token(error.field)}"
            added.add(error.field)
    stated = {k: v for k, v in note.to_fields().items() if v != ""}
    sides = tuple(s.side for s in note.sides)
    _check_agree(stated, given, sides, text_name, field_name)
    extra = [k for k in given if k not in stated]
    tokens = [k for k in extra if token(k)]
    if tokens:
        note = ClinicalNote.parse(text + "".join(f", {token(k)}" for k in tokens))
    rest = {k: given[k] for k in extra if k not in tokens}
    return note.replace(**rest) if rest else note


def note_from_reading(reading, fields: Mapping[str, object], *, text_name: str = "the note",
                      field_name: "str | Mapping[str, str]" = "the {} field") -> ClinicalNote:
    """The note from a free-text reading (a ``note.freetext.NoteReading``) and structured fields, under
    ``note_from_parts``' rule; a field the reading left undecided may come from the fields, one it found
    conflicting may not: the reading's NoteReadingError names what is left (never a guess)."""
    from dataclasses import replace

    given = _given(fields)
    stated = {k: v for k, v in reading.fields.items() if v}
    _check_agree({k: v for k, v in stated.items() if k == "side"}, {k: v for k, v in given.items() if k == "side"},
                 (), text_name, field_name)
    side = stated.get("side") or given.get("side")
    open_ = [k for k in reading.unresolved if k.split(".")[0] not in given]
    narrowed = replace(reading, unresolved=open_)
    if narrowed.blocking():
        narrowed.note()  # raises, naming the undecided and conflicting fields
    sides = SIDES if normalise_side(side) == "both" else (normalise_side(side),)
    _check_agree(stated, given, sides, text_name, field_name)
    return ClinicalNote.from_row({**stated, **given})


def note_from_any(note: "ClinicalNote | str | Mapping[str, object]") -> ClinicalNote:
    if isinstance(note, ClinicalNote):
        return note
    if isinstance(note, str):
        return ClinicalNote.parse(note)
    return ClinicalNote.from_row(note)


__all__ = ["ClinicalNote", "SideFindings", "NoteError", "ContradictionError", "PROMPT_TEMPLATE_VERSION", "PROMPT_TEMPLATES",
           "check_prompt_template", "prompt_clauses", "FIELDS",
           "N_STAGES", "T_STAGES", "M_STAGES", "SURGERIES", "CHEMOTHERAPIES", "PATHOLOGIES", "note_from_any",
           "note_from_parts", "note_from_reading"]
