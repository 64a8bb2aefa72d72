"""The review's confidence thresholds calibrated on a site's own cases (``mmcontour calibrate-review``).

Two review thresholds depend on the model *and* on the CTs it reads: the uncertain-voxel ratios
``ReviewConfig.max_uncertain_ratio`` (whole contour) and ``max_structure_uncertain_ratio`` (per structure).
A bundle ships them calibrated on its developer's phantoms; another site's scanner makes the model less
sure of itself, and those thresholds then flag too many of that site's right contours (v11: 8 of 29 at
the external phantom site, docs/results.md). So a clinic calibrates them on its own cases:

* each case of a manifest with a ``regions`` map (``mmcontour import-dicom`` writes one when the
  hospital exports the guideline's structures separately; phantoms have one) is contoured with the bundle
  and judged clinically right or wrong (``training.evaluate.clinical_check``: the regions it covers are
  exactly those its note calls for); a case without a regions map cannot be judged and is left out (counted);
* ``calibrate_jointly`` picks both thresholds at once so that the *whole* review flags at most ``budget``
  of the right contours (the checks without a threshold spend their share first); for a per-structure bundle
  it records each structure's left-out reference (the median over the site's right structures) and the factor
  above which a structure is flagged (``inference.review.structure_confidence_reasons``);
* the bundle is written again under a new name with those thresholds and where they came from
  (``inference.review.calibration``); its weights, and so its ``bundle_id``, are unchanged.

``contour_row`` is the one place a contour becomes a calibration row; ``bench/review_flags.py`` builds
its rows on it.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

#: Fewer right contours than this cannot place a threshold at a useful quantile.
MIN_RIGHT_CASES = 10


def share_text(part: int, whole: int) -> str:
    """"3/20 (15 %)": a count of a whole, as the calibration and the flags bench print it."""
    return f"{part}/{whole} ({100 * part / whole:.0f} %)" if whole else f"{part}/0"


def thresholds_text(entry: dict) -> str:
    """The confidence thresholds of a calibration (or a bundle's review) in one line, as the command and the
    bench print them."""
    references = entry.get("left_out_reference")
    if references:
        return (f"max_left_out_factor {entry.get('max_left_out_factor')} over the left-out references of "
                f"{len(references)} structures")
    return (f"max_uncertain_ratio {entry.get('max_uncertain_ratio')}, max_structure_uncertain_ratio "
            f"{entry.get('max_structure_uncertain_ratio')}")


def check_budget(budget: float) -> None:
    """Refuse a false-flag budget outside [0, 1) (before any contouring)."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"the false-flag budget must lie in [0, 1), got {budget}")


def contour_row(result, case_id: str, note, regions) -> dict:
    """One contour as the calibration sees it: clinically right or not, which kinds of flag it got,
    its uncertain-voxel ratios (whole and per structure) and the volume drawn per structure."""
    from .evaluate import clinical_check, region_coverage

    check = clinical_check(region_coverage(result.mask, regions), note)
    reasons = result.review.reasons
    measures = result.review.measures
    return {"case_id": case_id, "prompt": result.prompt, "correct": bool(check["correct"]),
            "missing": check["missing"], "extra": check["extra"], "volume_cc": round(result.volume_cc, 1),
            **{k: measures.get(k) for k in ("uncertain_ratio", "uncertain_cc", "uncertain_mm")},
            "kinds": sorted({r.kind for r in reasons}),
            "kinds_whole": sorted({r.kind for r in reasons if not r.structure}),
            "kinds_structure": sorted({r.kind for r in reasons if r.structure}),
            "reasons": result.review.to_dict()["reasons"],
            "structure_confidence": measures.get("structure_confidence"),
            "drawn_cc": result.structure_volumes(), "expected": list(getattr(result, "expected", ()) or ())}


def _judged(row: dict, key: str, min_cc: float, expected_only: bool = False) -> dict[str, float]:
    """{structure: its ``key`` measure} (``structure_confidence``) for a row's structures drawn larger than ``min_cc``,
    the ones the per-structure confidence check judges; ``expected_only``: only those its note's guideline calls for
    (the left-out check; a row without ``expected`` keeps every drawn one)."""
    drawn = row.get("drawn_cc") or {}
    expected = set(row.get("expected") or ()) if expected_only else set()
    return {name: m[key] for name, m in (row.get("structure_confidence") or {}).items()
            if m.get(key) is not None and drawn.get(name, m["volume_cc"]) > min_cc
            and (not expected or name in expected)}


def _structure_ratios(row: dict, min_cc: float) -> list[float]:
    """A row's per-structure uncertain ratios (the absolute check)."""
    return list(_judged(row, "uncertain_ratio", min_cc).values())


def _left_out(row: dict, min_cc: float) -> dict[str, float]:
    """{structure: left-out ratio} of a row's structures that the left-out check judges."""
    return _judged(row, "left_out_ratio", min_cc, expected_only=True)


def _flagged(row: dict, t1: float | None, t2: float | None, min_cc: float, references: dict | None = None,
             factor: float | None = None) -> bool:
    """Whether the whole review flags a row with confidence thresholds ``t1`` (contour) and ``t2`` (per
    structure): a flag of another kind as the row records it, or a ratio above its threshold. With
    ``references`` (a per-structure bundle's left-out references) the structures are judged by their left-out
    ratio against ``factor`` times their reference instead, and the whole contour by nothing (as the review does)."""
    if any(k != "confidence" for k in row["kinds"]):
        return True
    if references is not None:
        return any(ratio > factor * references[name] for name, ratio in _left_out(row, min_cc).items()
                   if name in references)
    return ((t1 is not None and (row["uncertain_ratio"] or 0.0) > t1)
            or (t2 is not None and any(x > t2 for x in _structure_ratios(row, min_cc))))


#: A structure's left-out reference needs at least this many right cases of it (else its mirror's is used).
MIN_REFERENCE_CASES = 3
#: A reference below this (left-out voxels per structure voxel) is raised to it: a structure the model never
#: leaves anything out of would otherwise be flagged for a single voxel.
MIN_REFERENCE = 0.01


def left_out_references(rows: Sequence[dict], min_cases: int = MIN_REFERENCE_CASES) -> tuple[dict, dict]:
    """Each structure's left-out reference: the median left-out ratio of its right structures (drawn larger than
    ``min_confidence_cc``) on the right contours of ``rows``. A structure with fewer than ``min_cases`` takes its
    mirror's (the other side's) when that has enough; one with neither has no reference (measured, not flagged).
    Returns (references, {structure: {"cases": its own right cases, "from": the structure whose median it is}})."""
    from ..inference.review import ReviewConfig

    min_cc = ReviewConfig().min_confidence_cc
    seen: dict[str, list[float]] = {}
    for row in rows:
        if row["correct"]:
            for name, ratio in _left_out(row, min_cc).items():
                seen.setdefault(name, []).append(ratio)
    references, provenance = {}, {}
    for name in sorted(set(seen) | {m for m in map(_mirror_name, seen) if m}):
        own = seen.get(name, [])
        other = _mirror_name(name)
        if len(own) >= min_cases:
            source = name
        elif other and len(seen.get(other, [])) >= min_cases:
            source = other
        else:
            continue
        references[name] = max(MIN_REFERENCE, round(float(np.median(seen[source])), 4))
        provenance[name] = {"cases": len(own), "from": source}
    return references, provenance


def _mirror_name(name: str) -> str | None:
    """The same structure on the other side (``CTVn_L3_L`` -> ``CTVn_L3_R``), or None (no side, or not in the table)."""
    from ..note.clinical import other_side
    from ..note.structures import structure_for

    row, side = structure_for(name)
    return row.name_for(other_side(side)) if row is not None and side else None


def calibrate_jointly(rows: Sequence[dict], false_flag_budget: float = 0.2, step: float = 0.005) -> dict:
    """Both confidence thresholds at once, so that the *whole* review (every kind of flag) flags at most
    ``false_flag_budget`` of the right contours: the note, range and input checks have no threshold and
    spend their share first; the confidence flags get what is left. One share q for both: the whole-contour
    threshold is the (1 - q) quantile of the right contours' uncertain ratios, the per-structure one that
    of their structures' (those drawn larger than ``min_confidence_cc``); q is the largest (most
    sensitive) on a grid of ``step`` that keeps the budget. When the checks without a threshold already
    spend it, q = 0: each threshold is the largest ratio a right contour showed.

    Rows of a per-structure bundle (left-out measures, with enough right cases of at least one structure) are
    calibrated the per-structure way instead (``_calibrate_left_out``): left-out references and their factor."""
    from ..inference.review import ReviewConfig

    min_cc = ReviewConfig().min_confidence_cc
    right = [r for r in rows if r["correct"]]
    if not right:
        return {"share": None, "reason": "no right contour in the calibration set"}
    references, provenance = left_out_references(rows)
    if references:  # a per-structure bundle, with enough right cases of at least one structure
        return _calibrate_left_out(right, references, provenance, false_flag_budget, min_cc)
    whole = [r["uncertain_ratio"] or 0.0 for r in right]
    pooled = [x for r in right for x in _structure_ratios(r, min_cc)]
    allowed = int(np.floor(false_flag_budget * len(right) + 1e-9))
    up = lambda x: float(np.ceil(x * 1000) / 1000)  # 3 decimals, rounded up: never flags more than computed
    q = false_flag_budget
    while True:
        t1 = up(np.quantile(whole, 1 - q))
        t2 = up(np.quantile(pooled, 1 - q)) if pooled else None
        flagged = sum(_flagged(r, t1, t2, min_cc) for r in right)
        if flagged <= allowed or q <= 0:
            break
        q = max(0.0, round(q - step, 6))
    return {"share": q, "max_uncertain_ratio": t1, "max_structure_uncertain_ratio": t2, "right": len(right),
            "right_flagged": int(flagged), "right_flagged_without_threshold": sum(_flagged(r, None, None, min_cc) for r in right),
            "budget": false_flag_budget}


def _calibrate_left_out(right: list[dict], references: dict, provenance: dict, budget: float, min_cc: float,
                        step: float = 0.25, most: float = 20.0) -> dict:
    """Per-structure bundles: each structure's left-out reference (``left_out_references``), and the factor: the
    default ``max_left_out_factor``, raised by ``step`` while the whole review flags more than ``budget`` of the
    right contours. The factor is not a quantile of these cases: on 20-40 cases the contour at the budget's
    quantile swings from case set to case set (docs/results.md), the median behind each reference does not."""
    from ..inference.review import ReviewConfig

    allowed = int(np.floor(budget * len(right) + 1e-9))
    factor = ReviewConfig().max_left_out_factor
    flagged = sum(_flagged(r, None, None, min_cc, references, factor) for r in right)
    while flagged > allowed and factor < most:
        factor = round(factor + step, 4)
        flagged = sum(_flagged(r, None, None, min_cc, references, factor) for r in right)
    return {"share": round(flagged / len(right), 4), "max_left_out_factor": factor, "left_out_reference": references,
            "reference_cases": provenance, "right": len(right), "right_flagged": int(flagged),
            "right_flagged_without_threshold": sum(_flagged(r, None, None, min_cc) for r in right), "budget": budget}


def flagged_with(rows: Sequence[dict], thresholds: dict) -> dict:
    """Right and wrong contours of ``rows`` the whole review flags with these confidence thresholds (the
    other kinds of flag as the rows record them): what a calibration does to the cases it was made on."""
    from ..inference.review import ReviewConfig

    min_cc = ReviewConfig().min_confidence_cc
    t1, t2 = thresholds.get("max_uncertain_ratio"), thresholds.get("max_structure_uncertain_ratio")
    references = thresholds.get("left_out_reference")
    factor = thresholds.get("max_left_out_factor") or ReviewConfig().max_left_out_factor
    flagged = lambda r: _flagged(r, t1, t2, min_cc, references, factor)
    right = [r for r in rows if r["correct"]]
    wrong = [r for r in rows if not r["correct"]]
    return {"right": len(right), "right_flagged": sum(map(flagged, right)),
            "wrong": len(wrong), "wrong_flagged": sum(map(flagged, wrong))}


def with_thresholds(bundle, joint: dict, provenance: dict):
    """``bundle`` (a ModelBundle) with ``calibrate_jointly``'s thresholds in ``inference.review`` and how
    they were found; refuses a calibration that found none."""
    from ..inference.review import BUNDLE_THRESHOLDS, ReviewConfig

    if joint.get("share") is None:
        raise ValueError(f"no thresholds to write: {joint.get('reason')}")
    values = {k: joint[k] for k in BUNDLE_THRESHOLDS if joint.get(k) is not None}
    if joint.get("left_out_reference"):
        values["left_out_reference"] = dict(joint["left_out_reference"])
    ReviewConfig.for_bundle(values)  # a threshold that is not a positive number is refused before writing
    bundle.inference.review = {**values, "calibration": {
        **provenance, "share": joint["share"], "right": joint["right"], "right_flagged": joint["right_flagged"],
        "budget": joint["budget"]}}
    return bundle


def calibration_rows(contourer, cases, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """``contour_row`` of each manifest case (``data.manifest.Case`` with a regions map) contoured by ``contourer``."""
    from ..image.grid import on_grid
    from ..image.readwrite import read_image

    rows = []
    for i, case in enumerate(cases):
        ct = read_image(case.ct)
        regions = on_grid(read_image(case.regions), ct)
        rows.append(contour_row(contourer.contour(ct, case.note), case.case_id, case.note, regions))
        if progress is not None:
            progress(i + 1, len(cases))
    return rows


def write_calibrated(bundle, rows: Sequence[dict], out: str | Path, budget: float,
                     provenance: dict, min_right: int = MIN_RIGHT_CASES) -> dict:
    """Calibrate on ``rows`` and write ``bundle`` (the ModelBundle that contoured them; its review is replaced)
    with the thresholds to ``out``; refuses, before writing, fewer than ``min_right`` right contours. Returns the
    calibration (thresholds, and what they flag on ``rows`` against what the bundle's own thresholds flagged)."""
    from ..inference.review import ReviewConfig

    check_budget(budget)
    right = sum(bool(r["correct"]) for r in rows)
    if right < min_right:
        raise ValueError(f"only {right} of {len(rows)} contours are clinically right: at least {min_right} are "
                         "needed to place a threshold; add cases")
    own = ReviewConfig.for_bundle(bundle.inference.review)
    before = {k: getattr(own, k) for k in ("max_uncertain_ratio", "max_structure_uncertain_ratio",
                                           "max_left_out_factor", "left_out_reference")}
    joint = calibrate_jointly(rows, budget)
    with_thresholds(bundle, joint, {**provenance, "cases": len(rows)}).save(out)
    return {"out": str(out), "bundle_id": bundle.bundle_id, "judged": len(rows), "right": right,
            "wrong": len(rows) - right, "budget": budget, "before": {**before, **flagged_with(rows, before)},
            "after": {**{k: joint.get(k) for k in before}, **flagged_with(rows, joint)}, "joint": joint}


def calibrate_review(bundle_path: str | Path, manifest: str | Path, out: str | Path, split: str | None = None,
                     budget: float = 0.2, llm: str | None = None, device: str = "auto",
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Contour ``manifest``'s cases (``split``; None: all) that have a regions map with the bundle, calibrate its
    confidence thresholds on them and write the bundle with them to ``out`` (``write_calibrated``). Returns the
    report, with the case rows."""
    from ..data.manifest import read_cases
    from ..inference.contourer import Contourer
    from ..model.bundle import ModelBundle

    check_budget(budget)
    cases = read_cases(manifest, split=split, require_ctv=False)
    judged = [c for c in cases if c.regions]
    if not judged:
        raise ValueError(f"none of the {len(cases)} case(s) of {manifest} has a regions map: without the guideline's "
                         "structures a contour cannot be judged right or wrong, so nothing can be calibrated "
                         "(mmcontour import-dicom writes one when the structures are exported separately)")
    bundle = ModelBundle.load(bundle_path)  # once: the contourer reads it, and it is written again with the thresholds
    rows = calibration_rows(Contourer(bundle, llm=llm, device=device), judged, progress)
    provenance = {"by": "mmcontour calibrate-review", "manifest": Path(manifest).name, "split": split or "all",
                  "on": _dt.date.today().isoformat()}
    report = write_calibrated(bundle, rows, out, budget, provenance)
    return {"bundle": str(bundle_path), "cases": len(cases), "without_regions": len(cases) - len(judged),
            **report, "rows": rows}
