"""A hospital's structure names -> our regions (``note.targets.REGION_LABELS``): the rules import-dicom maps by.

A rule is ``pattern, region[, side][, reason]``: ``pattern`` an fnmatch glob matched case-insensitively
against the whole (stripped) name, rules in order, the first match wins. ``region`` is one of

- a region kind (``breast``, ``chestwall``, ``axilla``, ``supraclavicular``, ``internal_mammary``) or a
  REGION_LABELS key (``axilla_left``): a part of the target that gets its label in the case's regions map;
- ``ctv`` or ``nodes``: a union (the whole CTV; all nodal levels together). It goes into the union ``ctv``
  but cannot be split into regions, so it is union-only: a case whose target needs one gets no regions map;
- ``exclude``: never part of the target (PTV, GTV, tumour bed / boost, organs at risk, markers), with a reason.

The side of a region comes from the rule's ``side``, else from the name (a token L / Lt / Left / R /
Rt / Right ...: "CTV_L1 Lt", "IMN_R", "BreastL"; "L1" / "L4" are levels, not sides), else from the
clinical table when the case is one-sided; a region on a side the clinical table does not treat
(e.g. "Breast_R", a contralateral organ, in a left-sided case) is ignored, with that reason.

The user's file (``read_structure_map``: CSV with a ``pattern,region[,side][,reason]`` header, or JSON
``{"rules": [{"pattern": ..., "region": ...}, ...]}``) comes first, the defaults after it, so a row of
the user's overrides the default for the names it matches (``exclude`` keeps a name out).
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..image.fileio import write_text
from ..note.targets import NODAL_REGIONS, REGION_LABELS

REGION_KINDS = tuple(dict.fromkeys(k.rsplit("_", 1)[0] for k in REGION_LABELS))
UNIONS = {"ctv": "a whole-CTV union: it cannot be split into regions",
          "nodes": "the union of the nodal levels (" + ", ".join(NODAL_REGIONS) + "): it cannot be split into levels"}
EXCLUDE = "exclude"
SIDE_WORDS = {"left": {"l", "lt", "lft", "left", "sin", "sx"}, "right": {"r", "rt", "rgt", "right", "dx", "dex"}}


def _side_word(word: str) -> str | None:
    w = word.strip().lower()
    return next((side for side, words in SIDE_WORDS.items() if w in words), None)


@dataclass(frozen=True)
class Rule:
    pattern: str
    region: str  # a REGION_KINDS entry, a REGION_LABELS key, a UNIONS key, or EXCLUDE
    side: str = ""  # "left" / "right"; empty: from the name, else from the clinical table
    reason: str = ""  # why a name is excluded (shown in the report)

    def __post_init__(self):
        region, side = self.region.strip().lower(), _side_word(self.side)
        if region not in (*REGION_KINDS, *REGION_LABELS, *UNIONS, EXCLUDE):
            raise ValueError(f"structure map rule {self.pattern!r}: region {self.region!r} is not one of "
                             f"{', '.join((*REGION_KINDS, *UNIONS, EXCLUDE))} (or a side-specific region: "
                             f"{', '.join(REGION_LABELS)})")
        if self.side.strip() and side is None:
            raise ValueError(f"structure map rule {self.pattern!r}: side {self.side!r} is not left or right")
        object.__setattr__(self, "region", region)
        object.__setattr__(self, "side", side or "")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name.strip().lower(), self.pattern.strip().lower())


def _word(w: str) -> tuple[str, ...]:
    """Patterns matching ``w`` as a whole word of a name (bounded by a non-letter or the name's ends)."""
    return w, f"{w}[!a-z]*", f"*[!a-z]{w}", f"*[!a-z]{w}[!a-z]*"


def _rules(region: str, patterns: Iterable[str], reason: str = "") -> list[Rule]:
    return [Rule(p, region, reason=reason) for p in patterns]


#: Exclusions first (a "PTV_Breast_L" or "Lt Lung" must not reach the region rules), then the regions
#: (internal mammary before breast: "internal mammary"; level 4 before the axilla: "AxL4"; a named axillary
#: level before the axilla as a whole: "AxL1" is level 1, "Axilla_L" the whole axilla), the unions last.
DEFAULT_RULES: tuple[Rule, ...] = tuple(
    _rules(EXCLUDE, ("*ptv*",), "planning target volume (the CTV plus a margin)")
    + _rules(EXCLUDE, ("*gtv*", "*itv*"), "gross / internal target volume")
    + _rules(EXCLUDE, ("*boost*", "*tumo*bed*", "*tb", "*_tb_*", "tb_*", "*lumpectomy*", "*cavity*", "*seroma*"),
             "tumour bed / boost (a part of the breast, not a guideline region)")
    + _rules(EXCLUDE, ("z*", "_*", "*^*", "*eval*", "*opt*", "*ring*", "*old*", "*dose*", "*avoid*"),
             "planning helper or evaluation structure")
    + _rules(EXCLUDE, ("body", "external", "*outline*", "patient*", "skin", "skin[ _-]*", "couch*", "*table*"),
             "body outline or couch")
    + _rules(EXCLUDE, ("*marker*", "*wire*", "*scar*", "*border*", "*areola*", "*nipple*", "*clip*", "*bolus*",
                       "*artefact*", "*artifact*", "*implant*", "*prosthes*", "*expander*", "*pacemaker*"),
             "marker, device or bolus")
    + _rules(EXCLUDE, ("*contra*", "*lung*", "*heart*", "*coronar*", "*lad", "lad[ _-]*", "*cord*", "*spinal*",
                       "*canal*", "*esoph*", "*oesoph*", "*thyro*", "*trachea*", "*larynx*", "*liver*", "*stomach*",
                       "*kidney*", "*humer*", "*plexus*", "*brachial*", "*sternum*", "rib*", "*_rib*", "*bone*",
                       "*vessel*", "*artery*", "*vein*", "*mandible*", "*brain*"),
             "organ at risk")
    + _rules("internal_mammary", ("*imn*", "*imc*", "*imln*", *_word("im"), "*int*mam*", "*parastern*"))
    + _rules("supraclavicular", ("*scv*", "*scf*", "*sclav*", "*supra*clav*", "*periclav*", "*l4", "*l4[!0-9]*",
                                 "*level*4*", "*level*iv*", "*lev*iv*"))
    # a range of levels ("Level I-III", "Ax L1-2") is the axilla as one region: it cannot be split
    + _rules("axilla", ("*[1-3]-[1-3]*", "*[1-3] - [1-3]*", "*[1-3]-l[1-3]*", "*[!a-z]i-ii*", "*[!a-z]i - ii*",
                        "*[!a-z]ii-iii*"))
    # the ESTRO axillary levels, 3 before 2 before 1 ("level iii" must not read as "level i")
    + _rules("axilla_l3", ("*l3", "*l3[!0-9]*", "*level*3*", "*lev*3*", "*level*iii*", "*lev*iii*"))
    + _rules("axilla_l2", ("*l2", "*l2[!0-9]*", "*level*2*", "*lev*2*", "*level*ii", "*level*ii[!i]*", "*lev*ii",
                           "*lev*ii[!i]*"))
    + _rules("axilla_l1", ("*l1", "*l1[!0-9]*", "*level*1*", "*lev*1*", "*level*i", "*level*i[!iv]*", "*lev*i",
                           "*lev*i[!iv]*"))
    + _rules("axilla", ("*axil*", "ax", "ax[!a-z]*", "axl*", "*[!a-z]ax", "*[!a-z]ax[!a-z]*", *_word("aln")))
    + _rules("chestwall", ("*chest*wall*", "*thorac*wall*", *_word("cw")))
    + _rules("breast", ("*breast*", "*brst*", "*mamma*"))
    + _rules("nodes", ("*node*", "*nodal*", "*lymph*", *_word("ln"), *_word("lns"), "ctvn*"))
    + _rules("ctv", ("*ctv*",)))


def side_in_name(name: str) -> str | None:
    """The side a structure name states ('left' / 'right'), None when it states none or both."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # "BreastLt" -> "Breast Lt", "AxL1" -> "Ax L1"
    found = {s for s in map(_side_word, re.split(r"[^A-Za-z0-9]+", spaced)) if s}
    return found.pop() if len(found) == 1 else None


@dataclass
class Verdict:
    """What one structure name became: ``status`` 'region' (``region`` is a REGION_LABELS key),
    'union' (in the union ctv only), 'ignored' / 'excluded' (not in the target; ``reason``), 'unrecognised'."""
    name: str
    status: str
    region: str = ""
    reason: str = ""
    pattern: str = ""

    @property
    def target(self) -> bool:
        return self.status in ("region", "union")


@dataclass
class StructureMap:
    rules: tuple[Rule, ...] = DEFAULT_RULES
    source: str = "defaults"
    user_rules: int = 0

    def rule_for(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.matches(name)), None)

    def classify(self, name: str, sides: Sequence[str] | None = None) -> Verdict:
        """The verdict on one name; ``sides``: the treated sides from the clinical table (None: unknown)."""
        rule = self.rule_for(name)
        if rule is None:
            return Verdict(name, "unrecognised", reason="no rule of the structure map matches")
        if rule.region == EXCLUDE:
            return Verdict(name, "excluded", reason=rule.reason or "excluded by the structure map", pattern=rule.pattern)
        if rule.region in UNIONS:
            return Verdict(name, "union", rule.region, UNIONS[rule.region], rule.pattern)
        kind, side = rule.region, rule.side
        if kind in REGION_LABELS:
            kind, side = rule.region.rsplit("_", 1)
        side = side or side_in_name(name) or (sides[0] if sides and len(sides) == 1 else "")
        if not side:
            why = "both sides are treated" if sides else "the clinical table gives no side"
            return Verdict(name, "union", kind, f"{kind}, but the name states no side and {why}: union only",
                           rule.pattern)
        if sides is not None and side not in sides:
            return Verdict(name, "ignored", f"{kind}_{side}", f"{kind} on the {side}, a side the clinical table does "
                                                              f"not treat (a contralateral organ?)", rule.pattern)
        return Verdict(name, "region", f"{kind}_{side}", pattern=rule.pattern)

    def classify_all(self, names: Iterable[str], sides: Sequence[str] | None = None) -> list[Verdict]:
        return [self.classify(n, sides) for n in dict.fromkeys(names)]

    def targets(self, names: Iterable[str]) -> list[str]:
        """The names that could be part of the target whatever the case's side (pairing a CT with its RTSTRUCT)."""
        return [v.name for v in self.classify_all(names) if v.target]


def default_structure_map() -> StructureMap:
    return StructureMap()


def read_structure_map(path: str | os.PathLike, defaults: bool = True) -> StructureMap:
    """The user's rules from ``path`` (CSV or JSON, by suffix), followed by the defaults when ``defaults``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure map not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            rows = data.get("rules") if isinstance(data, dict) else data
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError('expected {"rules": [{"pattern": ..., "region": ...}, ...]}')
        else:
            reader = csv.DictReader(io.StringIO(text))
            columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
            if not {"pattern", "region"} <= set(columns):
                raise ValueError(f"needs a header with the columns pattern,region (optional: side, reason); "
                                 f"it has {', '.join(columns) or 'none'}")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
            rows = [r for r in rows if r.get("pattern") and not r["pattern"].startswith("#")]
        rules = tuple(Rule(str(r["pattern"]), str(r["region"]), str(r.get("side") or ""), str(r.get("reason") or ""))
                      for r in rows)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"structure map {path}: {exc}") from None
    return StructureMap(rules + (DEFAULT_RULES if defaults else ()), str(path), len(rules))


def write_structure_map(path: str | os.PathLike, structure_map: StructureMap | None = None) -> Path:
    """Write the rules (default: the defaults) as CSV, or JSON when ``path`` ends in .json, for the user to edit."""
    rules = [asdict(r) for r in (structure_map or default_structure_map()).rules]
    if str(path).lower().endswith(".json"):
        return write_text(path, json.dumps({"rules": rules}, indent=1) + "\n")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=("pattern", "region", "side", "reason"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rules)
    return write_text(path, out.getvalue())


@dataclass
class CaseMapping:
    """The report of one case: every structure name's verdict, and whether a regions map was written."""
    verdicts: list[Verdict] = field(default_factory=list)
    regions_written: bool = False
    regions_note: str = ""

    def to_dict(self) -> dict:
        by = lambda status: {v.name: (v.region if status == "region" else v.reason)
                             for v in self.verdicts if v.status == status}
        return {"mapped": by("region"), "union_only": by("union"), "ignored": {**by("excluded"), **by("ignored")},
                "unrecognised": [v.name for v in self.verdicts if v.status == "unrecognised"],
                "regions_map": self.regions_written, "regions_note": self.regions_note}


__all__ = ["Rule", "Verdict", "StructureMap", "CaseMapping", "DEFAULT_RULES", "REGION_KINDS", "UNIONS", "EXCLUDE",
           "side_in_name", "default_structure_map", "read_structure_map", "write_structure_map"]
