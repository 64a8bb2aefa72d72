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
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from . import clinical as c

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


@dataclass(frozen=True)
class Evidence:
    start: int
    end: int
    text: str
    rule: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text, "rule": self.rule}


# -- the text, lower-cased and with typos and other-language words mapped, keeping offsets into the original -----

class _Text:
    def __init__(self, original: str):
        self.original = original
        self.chars = [_fold(ch) for ch in original]
        self.starts = list(range(len(original)))
        self.ends = list(range(1, len(original) + 1))

    @property
    def s(self) -> str:
        return "".join(self.chars)

    def sub(self, pattern: str, repl) -> None:
        text, chars, starts, ends, last = self.s, [], [], [], 0
        for m in re.finditer(pattern, text):
            new = repl(m) if callable(repl) else m.expand(repl)
            if new is None or m.start() == m.end():
                continue
            chars += self.chars[last:m.start()]
            starts += self.starts[last:m.start()]
            ends += self.ends[last:m.start()]
            chars += list(new)
            starts += [self.starts[m.start()]] * len(new)
            ends += [self.ends[m.end() - 1]] * len(new)
            last = m.end()
        self.chars, self.starts, self.ends = chars + self.chars[last:], starts + self.starts[last:], ends + self.ends[last:]

    def evidence(self, a: int, b: int, rule: str) -> Evidence:
        start, end = self.starts[a], self.ends[b - 1]
        return Evidence(start, end, self.original[start:end], rule)


def _fold(ch: str) -> str:
    """Lower case without accents, one character for one (offsets stay valid)."""
    low = ch.lower()
    if len(low) != 1:
        return ch
    if ord(low) < 0x250:
        low = unicodedata.normalize("NFD", low)[0]
    return low


_KEYWORDS = ("mastectomy", "lumpectomy", "quadrantectomy", "segmentectomy", "sentinel", "metastatic", "metastasis",
             "metastases", "micrometastasis", "micrometastases", "macrometastasis", "macrometastases", "carcinoma",
             "neoadjuvant", "adjuvant", "chemotherapy", "positive", "negative", "invasive", "lobular", "axillary",
             "bilateral", "excision")
_SIDE_TYPOS = {"right": ("rigth", "rihgt", "rgiht", "irght", "rght", "riht"), "left": ("lfet", "elft", "letf", "lft")}


def _one_edit(a: str, b: str) -> bool:
    """Damerau distance exactly one (substitution, insertion, deletion or swap of neighbours)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                   and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _correct(m: re.Match) -> str | None:
    word = m.group(0)
    for canonical, typos in _SIDE_TYPOS.items():
        if word in typos:
            return canonical
    if len(word) < 7 or word in _KEYWORDS:
        return None
    return next((k for k in _KEYWORDS if _one_edit(word, k)), None)


_TRANSLATIONS = (  # other-language words the rules below read in English (sides and surgeries: clinical.py)
    (r"mammakarzinom|brustkrebs|cancer du sein|cancer de mama|carcinoma de mama|유방암", " breast cancer "),
    (r"sentinel-?lymphknoten\w*|ganglios? centinelas?|ganglions? sentinelles?|감시림프절", " sentinel lymph node "),
    (r"lymphknoten|ganglios? linfaticos?|림프절", " lymph node "),
    (r"axilladissektion|diseccion axilar|curage axillaire", " axillary dissection "),
    (r"carcinoma (?:ductal|canalicular) infiltrante|carcinome canalaire infiltrant|invasiv\w* duktal\w* karzinom",
     " invasive ductal carcinoma "),
    (r"carcinoma lobulillar infiltrante|carcinome lobulaire infiltrant|invasiv\w* lobular\w* karzinom",
     " invasive lobular carcinoma "),
    (r"(\d{1,3})\s*(?:-?jahrige[nr]?|anos|ans|세)", r"\1 year old "),
)


def _normalise(original: str) -> _Text:
    text = _Text(original)
    text.sub(r"[a-z]+", _correct)
    for pattern, repl in _TRANSLATIONS:
        text.sub(pattern, repl)
    for canonical in ("left", "right", "both", "bcs", "mastectomy"):
        foreign = sorted({_phrase(a) for a in c._FOREIGN[canonical]}, key=len, reverse=True)
        word = {"bcs": " breast conserving surgery ", "both": " bilateral "}.get(canonical, f" {canonical} ")
        text.sub("|".join(foreign), word)
    return text


def _phrase(alias: str) -> str:
    folded = "".join(_fold(ch) for ch in alias)
    body = r"[\s\-]*".join(re.escape(w) for w in folded.split())
    return body if not folded.isascii() else rf"(?<![a-z]){body}(?![a-z])"


# -- clauses: sentences, and parts of sentences, each with the side(s) it speaks of --------------------------------

@dataclass
class _Part:
    start: int
    end: int
    sentence: int
    sides: frozenset = frozenset()        # the sides it names itself
    attributed: frozenset | None = None   # the sides its facts belong to (named, or carried over)
    normal: bool = False                  # a normal screening, a benign finding, a prophylactic operation
    history: bool = False                 # a remote history


_SIDE_WORD = r"(?<![a-z])(?P<side>left|right|bilateral|both|left and right)(?![a-z])"
_ANATOMY = (r"breast|axilla|axillary|sided?|chest|bcs|bct|mrm|ssm|nsm|lumpectomy|mastectomy|partial|segmental|"
            r"total|simple|wle|wide|slnb|alnd|sln|idc|ilc|dcis|quadrantectomy|modified|skin|nipple|upper|lower|"
            r"outer|inner")
_ABBREVIATION = rf"(?<![a-z/])(?P<abbr>lt|rt|l|r)\.?(?=[\s\-]*(?:{_ANATOMY})(?![a-z]))|\((?P<paren>lt|rt|l|r)\)"
_NORMAL = (r"normal|unremarkable|benign|bi-?rads:?\s*[12](?!\d)|no suspicious|prophylactic|risk[- ]reducing|"
           r"fibroadenoma|negative (?:mammogram|screening|imaging|mri|ultrasound)")
_HISTORY = (r"history of|h/o|hx of|personal history|previous(?:ly)?|prior(?! to)|remote|years ago|"
            r"(?<![/\-\d])(?:19|20)\d\d(?![\d/])")
_SIDE_OF = {"left": {"left"}, "right": {"right"}, "both": {"left", "right"}, "bilateral": {"left", "right"},
            "left and right": {"left", "right"}, "lt": {"left"}, "l": {"left"}, "rt": {"right"}, "r": {"right"}}


def _side_mentions(text: _Text) -> list[tuple[int, int, frozenset, bool]]:
    """(start, end, sides, explicit) for each side word; 'RT' in capitals is radiotherapy unless all is capitals."""
    s, upper = text.s, text.original.upper() == text.original
    found = [(m.start(), m.end(), frozenset(_SIDE_OF[m.group("side")]), m.group("side") in ("left", "right"))
             for m in re.finditer(_SIDE_WORD, s)]
    for m in re.finditer(_ABBREVIATION, s):
        abbr = m.group("abbr") or m.group("paren")
        if abbr == "rt" and text.original[m.start():m.start() + 2] == "RT" and not upper:
            continue
        found.append((m.start(), m.end(), frozenset(_SIDE_OF[abbr]), True))
    return sorted(found)


def _parts(text: _Text) -> tuple[list[_Part], list[tuple[int, int, frozenset, bool]]]:
    s, mentions = text.s, _side_mentions(text)
    parts: list[_Part] = []
    for number, sentence in enumerate(re.finditer(r"[^\n;]+?(?:[.!?](?=\s|$)|$|(?=[\n;]))", s)):
        for m in re.finditer(r"[^,:]+", sentence.group(0)):
            a, b = sentence.start() + m.start(), sentence.start() + m.end()
            if not s[a:b].strip():
                continue
            named = [sides for (x, y, sides, _) in mentions if a <= x < b]
            part = _Part(a, b, number, frozenset().union(*named) if named else frozenset())
            part.normal = bool(re.search(_NORMAL, s[a:b]))
            part.history = bool(re.search(_HISTORY, s[a:b]))
            parts.append(part)
    carried: frozenset | None = None
    for i, part in enumerate(parts):  # sides carry forward; a sentence's first parts take its own side if it has one
        if part.sides:
            carried = part.attributed = part.sides
            continue
        same = [p.sides for p in parts if p.sentence == part.sentence and p.sides]
        earlier = [p for p in parts[:i] if p.sentence == part.sentence and p.sides]
        if earlier:
            part.attributed = earlier[-1].sides
        elif same and len(set(same)) == 1:
            part.attributed = same[0]
        else:
            part.attributed = carried
        if earlier or same:
            part.history = part.history or any(p.history for p in parts if p.sentence == part.sentence and p.sides)
    return parts, mentions


# -- facts ---------------------------------------------------------------------------------------------------------

@dataclass
class _Fact:
    field: str
    value: str
    rank: int           # higher wins: 3 pathologic, 2 stated, 1 clinical
    evidence: Evidence
    part: _Part | None
    count: tuple | None = None  # node counts: (positive, examined, modifier)


_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                       "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUM = r"\d{1,2}|" + "|".join(_NUMBERS)
_COUNT = rf"(?<![\d/.])(?P<p>{_NUM})\s*(?:/|of|out of)\s*(?P<t>{_NUM})(?![\d/]|\.\d|\s*(?:cm|mm)\b)"
_NODE = r"(?<![a-z])(?:lymph ?nodes?|nodes?|nodal|lns?|slns?|slnb|alnd|sentinel|axilla(?:ry)?|p?n[0-3])(?![a-z])"
_SCORE_BEFORE = r"(?:grade|score|allred|er|pr|her2|ki-?67|nottingham|mitotic|nuclear)\W{0,3}$"
_NEGATIVE = (r"negative|benign|free of|no (?:evidence of )?(?:metasta\w*|tumou?r|carcinoma|malignan\w*|involvement)|"
             r"none (?:involved|positive)|uninvolved|not involved|without (?:metasta\w*|involvement)")
_MICRO = r"micrometasta\w*|micromets?(?![a-z])"
_MACRO = r"macrometasta\w*|macromets?(?![a-z])"
_ITC = r"isolated tumou?r cells|(?<![a-z])itcs?(?![a-z])"
_NEGATED_BEFORE = r"(?:no|without|negative for|absence of)\s+(?:\w+\s+){0,2}$"
_STAGE = r"(?P<pre>yp|rp|yc|c|p|y|r)?{letter}(?P<v>{values})(?P<par>(?:\s?\((?:mi|i\s?[+-]|sn|mol\s?[+-]|f|m|\d+)\))*)"
_T = _STAGE.format(letter="t", values=r"is|x|0|1mi|[1-4][a-d]?")
_N = _STAGE.format(letter="n", values=r"[0-3x](?:mi|[abc])?")
_M = _STAGE.format(letter="m", values=r"[01x]")
_RANK = {"": 2, "c": 1, "yc": 1}
_STAGE_RULE = {1: "clinical stage", 2: "stated stage", 3: "pathologic stage"}


def _stage_facts(text: _Text, locate) -> tuple[list[_Fact], bool]:
    """T, N and M stages, also glued (pT1cN1aM0: the T prefix carries); and whether a y prefix was seen."""
    s, facts, after_neoadjuvant, ends = text.s, [], False, {}
    for letter, pattern, field_name, normalise in (("t", _T, "t_stage", c.normalise_t_stage),
                                                   ("n", _N, "n_stage", c.normalise_n_stage),
                                                   ("m", _M, "m_stage", c.normalise_m_stage)):
        for m in re.finditer(pattern + r"(?:(?![a-z0-9])|(?=(?:yp|c|p)?[nm][0-3x]))", s):
            before = s[m.start() - 1] if m.start() else " "
            glued = ends.get(m.start())
            if before.isalnum() and glued is None:
                continue
            if letter == "t" and re.match(r"[\s\-]*weighted", s[m.end():]):
                continue
            prefix = m.group("pre") or (glued or "")
            try:
                value = normalise(re.sub(r"\s", "", m.group(0)).replace("(m)", ""))
            except c.NoteError:
                continue
            ends[m.end()] = prefix
            after_neoadjuvant |= prefix.startswith("y")
            rank = _RANK.get(prefix, 3)
            rule = "post-neoadjuvant stage" if prefix.startswith("y") and rank == 3 else _STAGE_RULE[rank]
            facts.append(_Fact(field_name, value, rank, text.evidence(m.start(), m.end(), rule), locate(m.start())))
    return facts, after_neoadjuvant


def _n_category(positive: int, modifier: str) -> str:
    if modifier == "itc" or positive == 0:
        return "N0"
    if modifier == "micro":
        return "N1mi"
    return "N1" if positive <= 3 else "N2" if positive <= 9 else "N3"


def _present(pattern: str, s: str) -> bool:
    return any(not re.search(_NEGATED_BEFORE, s[:m.start()]) for m in re.finditer(pattern, s))


def _node_facts(text: _Text, parts: list[_Part], locate) -> list[_Fact]:
    s, facts = text.s, []
    for sentence in sorted({p.sentence for p in parts}):
        members = [p for p in parts if p.sentence == sentence]
        a, b = members[0].start, members[-1].end
        body = s[a:b]
        clinical = 1 if re.search(r"clinical(?:ly)?|palpable|ultrasound|imaging|exam", body) else 3
        micro, macro, itc = _present(_MICRO, body), _present(_MACRO, body), _present(_ITC, body)
        modifier = "itc" if itc and not (micro or macro) else "micro" if micro and not macro else ""
        counted = False
        for m in re.finditer(_COUNT, body):
            x, y = a + m.start(), a + m.end()
            near = s[max(a, x - 30):min(b, y + 30)]
            if not re.search(_NODE, near) or re.search(_SCORE_BEFORE, s[max(a, x - 14):x]):
                continue
            positive, examined = (int(g) if g.isdigit() else _NUMBERS[g] for g in (m.group("p"), m.group("t")))
            if positive > examined or (positive and re.match(r"\W*(?:nodes?\W*)?(?:negative|benign|free)",
                                                             s[y:y + 20])):
                continue
            counted = True
            rule = {"itc": "isolated tumour cells", "micro": "micrometastasis"}.get(modifier, "node count")
            if positive == 0 and re.search(_NEGATIVE, s[a:min(b, y + 30)]):
                rule = "negation"
            facts.append(_Fact("n_stage", _n_category(positive, modifier), clinical, text.evidence(x, y, rule),
                               locate(x), count=(positive, examined, modifier)))
        if counted:
            continue
        for part in members:
            chunk = s[part.start:part.end]
            if not re.search(_NODE, s[max(a, part.start - 30):part.end]):
                continue
            if modifier == "micro" and not re.search(r"\bpositive\b", chunk) and re.search(_MICRO, chunk):
                m = re.search(_MICRO, chunk)
                facts.append(_Fact("n_stage", "N1mi", clinical, text.evidence(part.start + m.start(),
                                   part.start + m.end(), "micrometastasis"), part))
            elif modifier == "itc" and re.search(_ITC, chunk):
                m = re.search(_ITC, chunk)
                facts.append(_Fact("n_stage", "N0", clinical, text.evidence(part.start + m.start(),
                                   part.start + m.end(), "isolated tumour cells"), part))
            elif not (micro or macro) and re.search(_NEGATIVE, chunk) and not re.search(r"positive|metastatic (?:car|dis)", chunk):
                m = re.search(_NEGATIVE, chunk)
                rank = 1 if re.search(r"clinical(?:ly)?", chunk) else clinical
                facts.append(_Fact("n_stage", "N0", rank, text.evidence(part.start, part.end, "negation"), part))
    return facts


def _alias_pattern(names) -> str:
    free = [n for n in names if n not in ("total", "tm", "total mastectomy surgery", "breast conserving")]
    body = "|".join(sorted((_phrase(n).replace("mastectomy", "mastectom(?:y|ies)").replace("ectomy", "ectom(?:y|ies)")
                            for n in free if n.isascii()), key=len, reverse=True))
    return body


_OPTION_BEFORE = (r"(?<![a-z])(?:declined|refused|avoid\w*|rather than|instead of|over|not a candidate for|contraindicat\w*|"
                  r"vs\.?|versus|or|considering|discussed|options?(?: of| include)?)\s+(?:\w+\s+){0,2}$")
_OPTION_AFTER = (r"^\s*(?:vs\.?|versus|or\b)|^[^,]{0,40}?(?<![a-z])(?:declined|refused)(?!\s+(?:\w+\s+)?(?:chemo|radi|rt\b|"
                 r"endocrine|tamoxifen|therapy|treatment|reconstruction))")
_LATER = r"(?<![a-z])(?:completion|subsequent(?:ly)?|converted to|then|followed by)\s+(?:\w+\s+){0,2}$"


def _surgery_facts(text: _Text, locate) -> list[_Fact]:
    s, facts = text.s, []
    patterns = {k: _alias_pattern(c._SURGERY_ALIASES[k]) for k in c.SURGERIES}
    combined = "|".join(f"(?P<{k}>{p})" for k, p in patterns.items())
    for m in re.finditer(combined, s):
        value = m.lastgroup
        before = re.split(r"[.;\n]", s[max(0, m.start() - 60):m.start()])[-1]
        after = re.split(r"[.;\n]", s[m.end():m.end() + 40])[0]
        if re.search(_OPTION_BEFORE, before) or re.search(_OPTION_AFTER, after):
            continue
        later = value == "mastectomy" and bool(re.search(_LATER, before))
        fact = _Fact("surgery", value, 3 if later else 2,
                     text.evidence(m.start(), m.end(), "completion mastectomy" if later else "surgery term"),
                     locate(m.start()))
        facts.append(fact)
    return facts


_PATHOLOGY = (
    ("mixed", r"mixed (?:invasive )?ductal (?:and )?(?:/ ?)?lobular\w*(?: carcinoma)?"),
    ("IDC", r"(?<![a-z])idc(?![a-z])|(?:invasive|infiltrating) ductal carcinoma|ductal carcinoma(?! in situ)|"
            r"invasive (?:breast )?carcinoma,? (?:of )?no special type|(?<![a-z])nst(?![a-z])"),
    ("ILC", r"(?<![a-z])ilc(?![a-z])|(?:invasive|infiltrating) lobular carcinoma|lobular carcinoma(?! in situ)"),
    ("DCIS", r"(?<![a-z])dcis(?![a-z])|ductal carcinoma in situ"),
    ("mucinous", r"(?:mucinous|colloid) carcinoma"), ("tubular", r"tubular carcinoma"),
    ("medullary", r"medullary carcinoma"), ("metaplastic", r"metaplastic carcinoma"),
)


def _other_facts(text: _Text, locate) -> list[_Fact]:
    s, facts, taken = text.s, [], []
    for value, pattern in _PATHOLOGY:
        for m in re.finditer(pattern, s):
            if any(a <= m.start() < b for a, b in taken) or re.search(_NEGATED_BEFORE, s[max(0, m.start() - 40):m.start()]):
                continue
            taken.append((m.start(), m.end()))
            facts.append(_Fact("pathology", c.normalise_pathology(value), 2,
                               text.evidence(m.start(), m.end(), "pathology term"), locate(m.start())))
    chemo = (("neoadjuvant", 2, r"neo-?adjuvant(?! (?:endocrine|hormon\w*|letrozole|anastrozole|tamoxifen|exemestane))"
                                r"|(?<![a-z])nact?(?![a-z])|primary systemic (?:chemo)?therapy|pre-?operative chemo\w*"),
             ("adjuvant", 1, r"(?<!neo)(?<!neo-)adjuvant (?:chemo\w*|ac|tc|ac-t|ddac\w*|fec|cmf|taxol|paclitaxel|"
                             r"docetaxel|capecitabine)(?![a-z])"),
             ("none", 0, r"no (?:adjuvant |neoadjuvant )?chemo\w*|chemo\w* (?:was |is |will be )?(?:not (?:given|"
                         r"recommended|indicated|received|administered)|declined|omitted)|declined chemo\w*|"
                         r"did not receive (?:any )?chemo\w*|without chemo\w*"))
    for value, rank, pattern in chemo:
        for m in re.finditer(pattern, s):
            if value != "none" and re.search(r"(?:no|not|without|declined|did not receive)\s+(?:\w+\s+){0,1}$",
                                             s[max(0, m.start() - 25):m.start()]):
                continue
            specific = value == "none" and bool(re.search(r"adjuvant", m.group(0)))
            facts.append(_Fact("chemotherapy", value, rank - (1 if specific else 0),
                               text.evidence(m.start(), m.end(), "chemotherapy term"), locate(m.start())))
    ages = ((2, r"(?<![\d.])(\d{1,3})[\s\-]*(?:years?|yrs?|yr)[\s\-]*old|(?<![\d.])(\d{1,3})\s*(?:yo|y/o|y\.o\.)(?![a-z])|"
                r"(?<![\d.])(\d{2,3})\s*(?:f|female|woman|m|male|man)(?![a-z])"),
            (1, r"(?<![a-z])aged?:?\s*(\d{1,3})(?![\d.])"))
    for rank, pattern in ages:
        for m in re.finditer(pattern, s):
            if re.search(r"mother|sister|aunt|father|grandmother|daughter|family|cousin",
                         s[max(0, m.start() - 40):m.start()]):
                continue
            number = next(g for g in m.groups() if g)
            try:
                value = str(c.normalise_age(number))
            except c.NoteError:
                continue
            facts.append(_Fact("age", value, rank, text.evidence(m.start(), m.end(), "age"), None))
    return facts


# -- deciding --------------------------------------------------------------------------------------------------------

_BILATERAL = (r"bilateral\s+(?:\w+\s+){0,2}(?:cancers?|carcinomas?|ca|disease|idc|ilc|dcis)(?![a-z])|synchronous|"
              r"bilateral\s*:|both breasts")
_CANCER = r"carcinoma|cancer|(?<![a-z])(?:ca|idc|ilc|dcis)(?![a-z])|tumou?r|malignan|(?<![a-z])(?:yp|p|c)?[tn][0-4is]"


@dataclass
class _Decision:
    value: str | None = None
    evidence: list = field(default_factory=list)
    reason: str = ""          # why undecided
    conflict: list = field(default_factory=list)  # the facts that disagree


def _decide_side(text: _Text, parts: list[_Part], mentions) -> _Decision:
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
              if not next((p for p in parts if p.start <= m.start() < p.end), _Part(0, 0, 0)).normal]
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


def _decide(name: str, facts: list[_Fact]) -> _Decision:
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
        category = _n_category(total, "") if modifiers == {""} else None
        if category is None or category != _n_category(most, ""):
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
    t = _normalise(str(text))
    parts, mentions = _parts(t)

    def locate(i):
        return next((p for p in parts if p.start <= i < p.end), None)

    stages, after_neoadjuvant = _stage_facts(t, locate)
    facts = stages + _node_facts(t, parts, locate) + _surgery_facts(t, locate) + _other_facts(t, locate)
    if after_neoadjuvant:
        facts += [_Fact("chemotherapy", "neoadjuvant", 2, Evidence(f.evidence.start, f.evidence.end, f.evidence.text,
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


def _assemble(text: str, facts: list[_Fact], side: _Decision) -> NoteReading:
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

    def belongs(f: _Fact, target: str | None, strict: bool) -> bool:
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
