"""What a free-text note states, before anything is decided: the text normalised (typos of the long keywords,
other-language words), cut into parts with their side, history and normal-finding marks, and the facts each
rule finds (stages, node counts, surgeries, chemotherapy, age, T, M, histology) with their evidence spans.
``note.freetext`` decides the fields from these facts."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from . import clinical as c


@dataclass(frozen=True)
class Evidence:
    start: int
    end: int
    text: str
    rule: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text, "rule": self.rule}


# -- the text, lower-cased and with typos and other-language words mapped, keeping offsets into the original -----

class NoteText:
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


def normalise_text(original: str) -> NoteText:
    text = NoteText(original)
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
class Part:
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


def _side_mentions(text: NoteText) -> list[tuple[int, int, frozenset, bool]]:
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


def split_parts(text: NoteText) -> tuple[list[Part], list[tuple[int, int, frozenset, bool]]]:
    s, mentions = text.s, _side_mentions(text)
    parts: list[Part] = []
    for number, sentence in enumerate(re.finditer(r"[^\n;]+?(?:[.!?](?=\s|$)|$|(?=[\n;]))", s)):
        for m in re.finditer(r"[^,:]+", sentence.group(0)):
            a, b = sentence.start() + m.start(), sentence.start() + m.end()
            if not s[a:b].strip():
                continue
            named = [sides for (x, y, sides, _) in mentions if a <= x < b]
            part = Part(a, b, number, frozenset().union(*named) if named else frozenset())
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
class Fact:
    field: str
    value: str
    rank: int           # higher wins: 3 pathologic, 2 stated, 1 clinical
    evidence: Evidence
    part: Part | None
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


def stage_facts(text: NoteText, locate) -> tuple[list[Fact], bool]:
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
            facts.append(Fact(field_name, value, rank, text.evidence(m.start(), m.end(), rule), locate(m.start())))
    return facts, after_neoadjuvant


def n_category(positive: int, modifier: str) -> str:
    if modifier == "itc" or positive == 0:
        return "N0"
    if modifier == "micro":
        return "N1mi"
    return "N1" if positive <= 3 else "N2" if positive <= 9 else "N3"


def _present(pattern: str, s: str) -> bool:
    return any(not re.search(_NEGATED_BEFORE, s[:m.start()]) for m in re.finditer(pattern, s))


def node_facts(text: NoteText, parts: list[Part], locate) -> list[Fact]:
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
            facts.append(Fact("n_stage", n_category(positive, modifier), clinical, text.evidence(x, y, rule),
                               locate(x), count=(positive, examined, modifier)))
        if counted:
            continue
        for part in members:
            chunk = s[part.start:part.end]
            if not re.search(_NODE, s[max(a, part.start - 30):part.end]):
                continue
            if modifier == "micro" and not re.search(r"\bpositive\b", chunk) and re.search(_MICRO, chunk):
                m = re.search(_MICRO, chunk)
                facts.append(Fact("n_stage", "N1mi", clinical, text.evidence(part.start + m.start(),
                                   part.start + m.end(), "micrometastasis"), part))
            elif modifier == "itc" and re.search(_ITC, chunk):
                m = re.search(_ITC, chunk)
                facts.append(Fact("n_stage", "N0", clinical, text.evidence(part.start + m.start(),
                                   part.start + m.end(), "isolated tumour cells"), part))
            elif not (micro or macro) and re.search(_NEGATIVE, chunk) and not re.search(r"positive|metastatic (?:car|dis)", chunk):
                m = re.search(_NEGATIVE, chunk)
                rank = 1 if re.search(r"clinical(?:ly)?", chunk) else clinical
                facts.append(Fact("n_stage", "N0", rank, text.evidence(part.start, part.end, "negation"), part))
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


def surgery_facts(text: NoteText, locate) -> list[Fact]:
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
        fact = Fact("surgery", value, 3 if later else 2,
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


def other_facts(text: NoteText, locate) -> list[Fact]:
    s, facts, taken = text.s, [], []
    for value, pattern in _PATHOLOGY:
        for m in re.finditer(pattern, s):
            if any(a <= m.start() < b for a, b in taken) or re.search(_NEGATED_BEFORE, s[max(0, m.start() - 40):m.start()]):
                continue
            taken.append((m.start(), m.end()))
            facts.append(Fact("pathology", c.normalise_pathology(value), 2,
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
            facts.append(Fact("chemotherapy", value, rank - (1 if specific else 0),
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
            facts.append(Fact("age", value, rank, text.evidence(m.start(), m.end(), "age"), None))
    return facts


# -- deciding --------------------------------------------------------------------------------------------------------
