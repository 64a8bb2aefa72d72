"""Evaluation: bundles x manifest -> metrics (``mmcontour evaluate``).

Per case, on the CT's own grid with its spacing (MONAI metrics): Dice, IoU, HD95 in mm. Over
cases: means with 95% bootstrap confidence intervals (1,000 seeded resamples of cases).

Where the manifest has a ``regions`` column (phantoms: the sub-region label map of
``note.targets.REGION_LABELS``), two more things are checked per case:

* clinical accuracy, the paper's expert review made automatic: a region counts as *targeted*
  when the contour covers more than ``coverage_threshold`` of it; the case is correct when the
  targeted regions are exactly those the note asks for (``note.targets.region_names_for_note``).
  Side(s), nodal regions (present iff node-positive) and breast vs chest wall are also reported
  on their own.
* text-following: the case is contoured again with counterfactual notes (side flipped, for
  unilateral cases; N0 <-> N2) and checked against the counterfactual's own truth
  (``note.targets.ctv_for_note``): volumes on each side, nodal coverage, and whether the contour moved
  as the note says.

Per-structure bundles (``ContourResult.labels``): on cases with a regions map, Dice per structure of
the structure table against the note's guideline truth per structure (``note.targets.structure_label_map``);
structures empty in both are not counted, nor those the map cannot tell (an unsplit axilla, for levels
1-3). A single-CTV bundle gets no per-structure numbers, and the summary says so.

Every case, with or without regions: *side found*, whether the contour's volume lies on the note's
treated side(s) (unilateral: more than ``side_share`` of it on that side; bilateral: at least
1 - ``side_share`` on each), so that a vision-only model's side accuracy is measured like the others'.

Writes ``metrics.json``, ``cases.csv``, ``table.md`` (laid out like paper Table 1, then side found,
per-structure Dice and text-following) and ``overlays/<model>/<case>.png`` (axial and coronal,
prediction vs truth), through ``training.eval_outputs``.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..image.grid import on_grid
from ..inference.anatomy import cc_caudal_to
from ..note.clinical import ClinicalNote, other_side
from .eval_outputs import _flat, _safe, _write_csv, _write_json, write_overlay, write_table

SIDES = ("left", "right")
N_FLIP = {"N0": "N2", "N1mi": "N2", "N1": "N0", "N2": "N0", "N3": "N0"}


# -- per-case metrics -----------------------------------------------------------------------------

def _array_xyz(image: sitk.Image) -> np.ndarray:
    """sitk (z, y, x) array -> (x, y, z) bool, the axis order of ``image.GetSpacing()``."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0) > 0)


def segmentation_metrics(prediction: sitk.Image, truth: sitk.Image) -> dict[str, float]:
    """Dice, IoU and HD95 (mm) of two masks on one grid, with that grid's spacing.

    An empty prediction or truth has no surface: HD95 is NaN (left out of its confidence interval and
    counted). Both empty: Dice = IoU = 1."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    if prediction.GetSize() != truth.GetSize():
        raise ValueError(f"prediction {prediction.GetSize()} and truth {truth.GetSize()} are not on one grid")
    p, t = _array_xyz(prediction), _array_xyz(truth)
    spacing = [float(s) for s in truth.GetSpacing()]
    if not p.any() and not t.any():
        return {"dice": 1.0, "iou": 1.0, "hd95": math.nan}
    pt, tt = torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float()
    dice = float(compute_dice(pt, tt, include_background=True, ignore_empty=False)[0, 0])
    iou = float(compute_iou(pt, tt, include_background=True, ignore_empty=False)[0, 0])
    if not p.any() or not t.any():
        return {"dice": dice, "iou": iou, "hd95": math.nan}
    with warnings.catch_warnings():  # MONAI 1.5+ warns about one of its own internal arguments
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(pt, tt, include_background=True, percentile=95, spacing=spacing)
    return {"dice": dice, "iou": iou, "hd95": float(hd[0, 0])}


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and percentile bootstrap CI over cases (``scipy.stats.bootstrap``); NaNs are left out and
    counted in ``excluded``. One case has no spread to resample: its CI is its value."""
    from scipy.stats import bootstrap

    x = np.asarray(values, float)
    finite = x[np.isfinite(x)]
    result = {"mean": None, "ci_low": None, "ci_high": None, "n": int(finite.size), "excluded": int(x.size - finite.size)}
    if finite.size == 0:
        return result
    low = high = float(finite.mean())
    if finite.size > 1:
        ci = bootstrap((finite,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    result.update(mean=float(finite.mean()), ci_low=low, ci_high=high)
    return result


# -- anatomy-aware checks -------------------------------------------------------------------------

def side_volumes(mask: sitk.Image, midline_x: float = 0.0) -> dict[str, float]:
    """Volume (cc) of the mask on the patient's left (LPS x > midline) and right, from each voxel's
    physical position (the CT's origin, spacing and direction)."""
    arr = sitk.GetArrayViewFromImage(mask) > 0
    idx = np.argwhere(arr)[:, ::-1].astype(float)  # (x, y, z) indices
    voxel_cc = float(np.prod(mask.GetSpacing())) / 1000.0
    if idx.size == 0:
        return {"left_cc": 0.0, "right_cc": 0.0}
    d = np.array(mask.GetDirection()).reshape(3, 3)
    x = mask.GetOrigin()[0] + (idx * np.array(mask.GetSpacing())) @ d[0]
    left = int((x > midline_x).sum())
    return {"left_cc": left * voxel_cc, "right_cc": (len(x) - left) * voxel_cc}


def _whole_regions() -> list[str]:
    """The REGION_LABELS keys that are regions in their own right, not parts of one (the axilla, not its levels)."""
    from ..note.targets import REGION_LABELS, REGION_PARTS, region_kind

    parts = {p for ps in REGION_PARTS.values() for p in ps}
    return [name for name in REGION_LABELS if region_kind(name) not in parts]


def region_coverage(mask: sitk.Image, regions: sitk.Image, parts: bool = False) -> dict[str, float]:
    """Fraction of each sub-region (present in ``regions``) that the mask covers. A region that is split
    into parts (``note.targets.REGION_PARTS``: the axilla into levels 1-3) counts as one with its parts,
    whether the map holds it whole, in parts or both (``labels_of``); ``parts`` adds each part on its own."""
    from ..note.targets import REGION_LABELS, labels_of

    m = sitk.GetArrayViewFromImage(mask) > 0
    r = sitk.GetArrayViewFromImage(regions)
    counts = np.bincount(r.ravel(), minlength=max(REGION_LABELS.values()) + 1)
    covered = np.bincount(r[m].ravel(), minlength=counts.size)
    out = {}
    for name in _whole_regions():
        labels = labels_of(name)
        total = int(counts[labels].sum())
        if total:
            out[name] = float(covered[labels].sum() / total)
    if parts:
        whole = set(_whole_regions())
        for name, label in REGION_LABELS.items():
            if name not in whole and counts[label]:
                out[name] = float(covered[label] / counts[label])
    return out


def expected_regions(note: ClinicalNote, coverage: Mapping[str, float]) -> set[str]:
    """The regions the note asks for, on this anatomy (a removed breast is not in ``coverage``)."""
    from ..note.targets import region_names_for_note

    has_breast = {s: f"breast_{s}" in coverage for s in SIDES}
    return set(region_names_for_note(note, has_breast))


def clinical_check(coverage: Mapping[str, float], note: ClinicalNote, threshold: float = 0.5) -> dict:
    """Which regions the contour targets vs what the note asks for: side(s), nodal iff node-positive,
    breast vs chest wall, and overall (targeted == expected). Regions are counted whole (the axilla with
    its levels, ``region_coverage``); parts in ``coverage`` are left out."""
    from ..note.targets import NODAL_REGIONS

    whole = set(_whole_regions())
    coverage = {k: v for k, v in coverage.items() if k in whole}
    targeted = {name for name, c in coverage.items() if c > threshold}
    expected = expected_regions(note, coverage)
    side_of = lambda name: name.rsplit("_", 1)[1]
    nodal = {f"{r}_{s}" for r in NODAL_REGIONS for s in SIDES} & set(coverage)
    local = {f"{r}_{s}" for r in ("breast", "chestwall") for s in SIDES} & set(coverage)
    treated = {s.side for s in note.sides}
    return {
        "sides_ok": {side_of(n) for n in targeted} == treated,
        "nodal_ok": (targeted & nodal) == (expected & nodal),
        "breast_vs_chestwall_ok": (targeted & local) == (expected & local),
        "correct": targeted == expected,
        "targeted": sorted(targeted), "expected": sorted(expected),
        "missing": sorted(expected - targeted), "extra": sorted(targeted - expected),
    }


def side_found(volumes: Mapping[str, float], note: ClinicalNote, share: float = 0.8) -> bool:
    """Whether the contour lies on the note's treated side(s), from ``side_volumes`` alone (no regions map):
    unilateral -> more than ``share`` of its volume on that side; bilateral -> at least 1 - ``share`` on
    each side. An empty contour found no side."""
    left, right = float(volumes["left_cc"]), float(volumes["right_cc"])
    total = left + right
    if total <= 0:
        return False
    treated = {s.side for s in note.sides}
    if len(treated) == 1:
        return volumes[f"{treated.pop()}_cc"] / total > share
    return min(left, right) / total >= 1 - share


def structure_dice(labels: "sitk.Image | np.ndarray", classes: Sequence[str], regions: "sitk.Image | np.ndarray",
                   note: ClinicalNote) -> tuple[dict[str, float], list[str]]:
    """Dice per structure of a per-structure contour (``labels``: 1 + class index, 0 outside, on the grid of
    ``regions``) against the note's guideline truth per structure (``note.targets.structure_label_map``).

    Returns ({structure: Dice} for the structures present in the truth or the prediction, [structures not
    scored]): a structure empty in both is not counted; one whose truth the map cannot tell (the note's CTV
    holds a region that is split into parts there held whole, e.g. an unsplit axilla for levels 1-3) is not
    scored."""
    from ..image.metrics import dice
    from ..note.targets import REGION_LABELS, REGION_PARTS, UNKNOWN_CLASS, region_structure, structure_label_map

    classes = tuple(classes)
    view = lambda x: sitk.GetArrayViewFromImage(x) if isinstance(x, sitk.Image) else np.asarray(x)
    pred, r = view(labels), view(regions)
    truth = structure_label_map(r, note, classes)  # on the array: a view of a temporary image would dangle
    if pred.shape != truth.shape:
        raise ValueError(f"labels {pred.shape} and regions {truth.shape} are not on one grid")
    key_of = {v: k for k, v in REGION_LABELS.items()}
    unscored = []
    for value in np.unique(r[truth == UNKNOWN_CLASS]).tolist():
        kind, side = key_of[int(value)].rsplit("_", 1)
        for part in REGION_PARTS.get(kind, ()):
            name = region_structure(f"{part}_{side}")
            if name in classes and name not in unscored:
                unscored.append(name)
    out = {}
    for i, name in enumerate(classes):
        if name in unscored:
            continue
        p, t = pred == i + 1, truth == i + 1
        if p.any() or t.any():
            out[name] = dice(p, t)
    return out, unscored


def nodal_coverage(coverage: Mapping[str, float]) -> dict[str, float | None]:
    """Mean coverage of the nodal regions on each side."""
    from ..note.targets import NODAL_REGIONS

    out = {}
    for s in SIDES:
        values = [coverage[f"{r}_{s}"] for r in NODAL_REGIONS if f"{r}_{s}" in coverage]
        out[s] = float(np.mean(values)) if values else None
    return out


def counterfactual_notes(note: ClinicalNote) -> dict[str, ClinicalNote]:
    """``side``: the other side (unilateral notes only); ``nodes``: N0/N1mi -> N2, N1-N3 -> N0, per side."""
    out = {}
    if note.side in SIDES:
        out["side"] = note.replace(side=other_side(note.side))
    flipped = tuple(dataclasses.replace(s, n_stage=N_FLIP[s.n_stage]) for s in note.sides)
    out["nodes"] = dataclasses.replace(note, sides=flipped)
    return out


# -- the run --------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    manifest: str
    out: str
    bundles: Sequence[str]
    labels: Sequence[str] = ()
    split: str | None = "test"  # None: every case
    llm: str | None = None
    device: str = "auto"
    counterfactuals: bool = True
    coverage_threshold: float = 0.5
    n_bootstrap: int = 1000
    seed: int = 0
    overlays: bool = True
    midline_x: float = 0.0
    side_share: float = 0.8  # side found: more than this share of a unilateral contour on the treated side
    progress: bool = True


def _model_label(bundle, path: Path, taken: set[str]) -> str:
    label = bundle.name or path.name
    if label in taken:
        label = f"{label} ({path.name})"
    return label


def evaluate(config: EvalConfig,
             contourer_factory: Callable[[str], object] | None = None) -> dict:
    """Evaluate each bundle on the manifest's ``split``; writes the files and returns ``metrics.json``'s content.

    ``contourer_factory(bundle_path)`` may supply a ready ``Contourer``-like object (``.contour(ct, note)``
    -> result with ``.mask``, ``.bundle``) instead of loading one."""
    from tqdm import tqdm

    from ..data.manifest import read_cases
    from ..image.readwrite import read_image
    from ..inference.contourer import Contourer

    cases = read_cases(config.manifest, split=config.split)  # ManifestError when the split has no case
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    factory = contourer_factory or (lambda b: Contourer.from_bundle(b, llm=config.llm, device=config.device))
    models, rows, taken = [], [], set()
    for i, bundle_path in enumerate(config.bundles):
        contourer = factory(str(bundle_path))
        label = config.labels[i] if i < len(config.labels) else _model_label(contourer.bundle, Path(bundle_path), taken)
        taken.add(label)
        t0 = time.perf_counter()
        per_case = []
        for case in tqdm(cases, desc=label, unit="case", disable=not config.progress, file=sys.stderr):
            ct = read_image(case.ct)
            truth = on_grid(read_image(case.ctv), ct)
            regions = on_grid(read_image(case.regions), ct) if case.regions else None
            per_case.append(_evaluate_case(contourer, case, ct, truth, regions, config, out, label))
        for row in per_case:
            rows.append({"model": label, **_flat(row)})
        models.append(_summarise(label, str(bundle_path), contourer, per_case, config, time.perf_counter() - t0))
    metrics = {"manifest": str(config.manifest), "split": config.split, "n_cases": len(cases),
               "coverage_threshold": config.coverage_threshold, "side_share": config.side_share,
               "bootstrap": {"resamples": config.n_bootstrap, "seed": config.seed, "level": 0.95},
               "models": models}
    _write_json(out / "metrics.json", metrics)
    _write_csv(out / "cases.csv", rows)
    write_table(models, out / "table.md", config.side_share)
    return metrics


def _evaluate_case(contourer, case, ct, truth, regions, config: EvalConfig, out: Path, label: str) -> dict:
    result = contourer.contour(ct, case.note)
    row = {"case_id": case.case_id, "prompt": case.prompt,
           **segmentation_metrics(result.mask, truth), **side_volumes(result.mask, config.midline_x)}
    row["volume_cc"] = row["left_cc"] + row["right_cc"]
    row["side_found"] = side_found(row, case.note, config.side_share)
    row["unilateral"] = len(case.note.sides) == 1
    report = getattr(result, "anatomical_range", None) or {}
    row["range_dropped_cc"] = float(report.get("dropped_cc", 0.0))
    row["caudal_to_lung_base_cc"] = cc_caudal_to(result.mask, report.get("limits_mm", {}).get("lung_base"))
    labels = getattr(result, "labels", None)
    row["per_structure"] = labels is not None
    reasons = _review_reasons(result)
    row["needs_review"] = bool(reasons)
    row["review_kinds"] = ";".join(sorted({r.kind + ("/structure" if r.structure else "") for r in reasons}))
    row["review_reasons"] = " | ".join(r.line() for r in reasons)
    # the confidence measures behind the flags, so thresholds can be studied without contouring again
    measures = getattr(getattr(result, "review", None), "measures", None) or {}
    row["uncertain_ratio"] = measures.get("uncertain_ratio")
    row["structure_uncertain"] = {name: m.get("uncertain_ratio")
                                  for name, m in (measures.get("structure_confidence") or {}).items()}
    row["structure_left_out"] = {name: m["left_out_ratio"]
                                 for name, m in (measures.get("structure_confidence") or {}).items()
                                 if m.get("left_out_ratio") is not None}
    if regions is not None:
        coverage = region_coverage(result.mask, regions)
        row["clinical"] = clinical_check(coverage, case.note, config.coverage_threshold)
        row["nodal_coverage"] = nodal_coverage(coverage)
        if labels is not None:
            row["structure_dice"], unscored = structure_dice(labels, result.classes, regions, case.note)
            row["structures_unscored"] = ";".join(unscored)
    if config.counterfactuals:
        row["counterfactual"] = {kind: _counterfactual(contourer, ct, kind, note, row, regions, config)
                                 for kind, note in counterfactual_notes(case.note).items()}
    if config.overlays:
        folder = out / "overlays" / _safe(label)
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{case.case_id}: {case.prompt}\nDice {row['dice']:.3f}, HD95 {row['hd95']:.1f} mm"
        write_overlay(ct, result.mask, truth, folder / f"{_safe(case.case_id)}.png", title)
    return row


def _review_reasons(result) -> list:
    """The review's reasons of a contour ([] for a contourer without a review)."""
    return list(getattr(getattr(result, "review", None), "reasons", []))


def _counterfactual(contourer, ct, kind: str, note: ClinicalNote, row: dict, regions, config: EvalConfig) -> dict:
    """Contour with a counterfactual note. ``follows``: side flip -> the contour is on the new side only
    (with regions; without them: most of its volume is on the new side) and grew there; N flip -> nodal
    regions targeted iff the new note is node-positive (needs regions; else None)."""
    result = contourer.contour(ct, note)
    mask = result.mask
    volumes = side_volumes(mask, config.midline_x)
    # whether the review asks for a check: a note the model does not follow should not pass silently
    entry = {"prompt": note.to_prompt(), **volumes, "needs_review": bool(_review_reasons(result))}
    side_flip = kind == "side"
    other = other_side(note.side) if side_flip else None
    if regions is None:
        entry["follows"] = bool(volumes[f"{note.side}_cc"] > volumes[f"{other}_cc"]) if side_flip else None
        return entry
    from ..note.targets import ctv_for_note

    coverage = region_coverage(mask, regions)
    check = clinical_check(coverage, note, config.coverage_threshold)
    entry.update(nodal_coverage=nodal_coverage(coverage), correct=check["correct"],
                 dice_vs_truth=segmentation_metrics(mask, ctv_for_note(regions, note))["dice"])
    if side_flip:
        entry["follows"] = bool(check["sides_ok"] and volumes[f"{note.side}_cc"] > row[f"{note.side}_cc"])
    else:
        entry["follows"] = bool(check["nodal_ok"])
    return entry


def _summarise(label, bundle_path, contourer, per_case, config: EvalConfig, seconds: float) -> dict:
    ci = lambda values, k: bootstrap_ci(values, config.n_bootstrap, config.seed + k)
    summary = {"model": label, "bundle": bundle_path, "bundle_id": getattr(contourer.bundle, "bundle_id", ""),
               "text_encoder": getattr(getattr(contourer.bundle, "text_encoder", None), "kind", ""),
               "n_cases": len(per_case), "seconds": round(seconds, 2),
               "dice": ci([r["dice"] for r in per_case], 0), "iou": ci([r["iou"] for r in per_case], 1),
               "hd95_mm": ci([r["hd95"] for r in per_case], 2)}
    summary["side_found"] = ci([float(r["side_found"]) for r in per_case], 40)
    unilateral = [float(r["side_found"]) for r in per_case if r["unilateral"]]
    if unilateral:
        summary["side_found_unilateral"] = ci(unilateral, 41)
    summary["structures"] = _structure_summary(per_case, ci)
    caudal = [r["caudal_to_lung_base_cc"] for r in per_case if r.get("caudal_to_lung_base_cc") is not None]
    summary["anatomical_range"] = {
        "cases_with_lung_base": len(caudal), "caudal_to_lung_base_cc_max": max(caudal) if caudal else None,
        "cases_with_cc_caudal_to_lung_base": sum(1 for c in caudal if c > 0),
        "dropped_cc_mean": round(float(np.mean([r.get("range_dropped_cc", 0.0) for r in per_case])), 2) if per_case else None}
    checked = [r for r in per_case if "clinical" in r]
    if checked:
        summary["clinical"] = {key: ci([float(r["clinical"][key]) for r in checked], 3 + j)
                               for j, key in enumerate(("correct", "sides_ok", "nodal_ok", "breast_vs_chestwall_ok"))}
        summary["review_flags"] = review_flag_rates(checked)
    followed = [r["counterfactual"] for r in per_case if "counterfactual" in r]
    tf = {}
    for j, kind in enumerate(("side", "nodes")):
        entries = [cf[kind] for cf in followed if kind in cf and cf[kind]["follows"] is not None]
        if entries:
            tf[kind] = {"follows": ci([float(e["follows"]) for e in entries], 10 + j)}
            if "dice_vs_truth" in entries[0]:
                tf[kind]["dice_vs_truth"] = ci([e["dice_vs_truth"] for e in entries], 20 + j)
            missed = [e for e in entries if not e["follows"]]
            tf[kind]["not_followed"] = len(missed)
            tf[kind]["not_followed_flagged"] = sum(bool(e.get("needs_review")) for e in missed)
    both = [float(all(e["follows"] for e in cf.values())) for cf in followed
            if all(e["follows"] is not None for e in cf.values())]
    if both:
        tf["all"] = {"follows": ci(both, 30)}
    if tf:
        summary["text_following"] = tf
    return summary


def review_flag_rates(rows: Sequence[dict]) -> dict:
    """How the review flags separate clinically wrong contours from right ones (issue 11's target: >= 90 %
    of the wrong ones flagged, <= 20 % of the right ones): counts, sensitivity and false-flag rate, in
    total and per kind of flag (``kind`` or ``kind/structure`` for a flag that names a structure)."""
    def rates(flagged) -> dict:
        wrong = [r for r in rows if not r["clinical"]["correct"]]
        right = [r for r in rows if r["clinical"]["correct"]]
        wf, rf = sum(1 for r in wrong if flagged(r)), sum(1 for r in right if flagged(r))
        return {"wrong": len(wrong), "wrong_flagged": wf, "right": len(right), "right_flagged": rf,
                "sensitivity": wf / len(wrong) if wrong else None,
                "false_flag_rate": rf / len(right) if right else None}

    out = {"any": rates(lambda r: r.get("needs_review", False))}
    kinds = sorted({k for r in rows for k in (r.get("review_kinds") or "").split(";") if k})
    out["by_kind"] = {k: rates(lambda r, k=k: k in (r.get("review_kinds") or "").split(";")) for k in kinds}
    return out


def _structure_summary(per_case: list[dict], ci) -> dict:
    """Per-structure mean Dice over the cases that score it, or why there is none."""
    from ..note.structures import structure_classes

    if not any(r["per_structure"] for r in per_case):
        return {"available": False, "why": "single-CTV bundle (one output): no per-structure contours to score"}
    scored = [r["structure_dice"] for r in per_case if "structure_dice" in r]
    if not scored:
        return {"available": False, "why": "no case has a regions map: per-structure truth needs one"}
    names = [n for n in structure_classes() if any(n in d for d in scored)]
    names += sorted({n for d in scored for n in d} - set(names))
    out = {"available": True, "cases": len(scored),
           "dice": {n: ci([d[n] for d in scored if n in d], 50 + j) for j, n in enumerate(names)}}
    per_case_mean = [float(np.mean(list(d.values()))) for d in scored if d]
    if per_case_mean:
        out["mean_dice"] = ci(per_case_mean, 49)  # per case: mean over its scored structures
    return out
