"""Review flags of a contour: why a clinician should look at it twice, one line per reason.

``review_contour`` checks what needs no per-structure network output:

* input: the CT against the range of the bundle's training CTs (``training["ct_range"]``, written by
  training from ``image.ctstats``): slice / pixel spacing coarser than trained, a field of view or
  body size outside the trained range, body HU percentiles outside it (calibration, contrast);
* confidence: the share of uncertain voxels (probability strictly between ``uncertain_band``) per
  voxel of the contour;
* volume: an empty contour, or one implausibly small or large for the note;
* anatomical range: what ``inference.anatomy`` removed where no breast CTV or nodal level can lie, when
  it is more than ``max_dropped_cc``;
* note against CT (``mound_reasons``): a side the note calls a mastectomy where the CT shows a breast mound.

Per structure (per-structure bundles; the contourer adds these to the same review):

* note consistency (``structure_reasons``): a structure the note's guideline excludes is drawn, or one
  it calls for is missing, or far below or above the sizes seen in training;
* confidence (``structure_confidence_reasons``): for structures of more than a few cc, on the model grid,
  what the model leaves out of each structure (probability 0.2 up to the threshold outside the contour)
  against that structure's own reference on right contours (a calibrated bundle), or else the uncertain
  voxels of its probability per voxel of it.

A ``Reason`` may name a structure, so that per-structure checks add reasons to the same list; a
bundle without a training range gives no input flag and says so in ``notes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..image.ctstats import AXES, ct_statistics
from ..note.clinical import SURGERY_PROMPT, ClinicalNote, other_side
from ..note.structures import structure_for
from ..note.targets import is_nodal_structure


@dataclass(frozen=True)
class ReviewConfig:
    # Probabilities in this open band are "uncertain"; 0.2 / 0.8 are far enough from the 0.5 threshold
    # that the partial-volume rim of a confident contour (one voxel) stays mostly outside it.
    uncertain_band: tuple[float, float] = (0.2, 0.8)
    # Uncertain voxels per contour voxel above which the contour is flagged: the 80th percentile of the
    # right contours of the shipped bundle (v5) on 20 internal planning-CT phantoms (bench/review_flags.py
    # --calibrate 20, seed 3: right 0.47-1.83, wrong 0.57-1.60), so that at most 20 % of right contours are
    # flagged (issue 11's budget). Its wrong contours are no less confident than its right ones: the
    # per-structure note checks, not this ratio, are what catch them (docs/results.md).
    max_uncertain_ratio: float = 1.40
    # CTV volume per treated side (cc). The smallest whole-breast / chest-wall CTV of a small patient
    # is about 100 cc (a thin chest wall 3-5 mm deep over ~250 cm2); below 50 cc the contour cannot
    # be the whole target. A large breast with all nodal levels stays under about 2,500 cc; above
    # 3,000 cc the contour has spread beyond the target (into the other breast, lung or abdomen).
    min_cc_per_side: float = 50.0
    max_cc_per_side: float = 3000.0
    # Tolerances around the training range: spacing and sizes relative, HU absolute.
    relative_tolerance: float = 0.10
    hu_tolerance: float = 30.0
    # A structure the note's guideline excludes is flagged above this volume (cc): a few cc are the
    # partial-volume rim where two structures meet.
    max_excluded_cc: float = 5.0
    # A structure the guideline calls for is flagged below this share of the smallest volume seen in training.
    min_share_of_trained: float = 0.25
    # ... and above this multiple of the largest volume seen in training: it has spread beyond its level (into
    # muscle, fat or the next level). Twice the largest leaves room for patients larger than the training set's.
    max_times_trained: float = 2.0
    # A structure the guideline calls for with less than this (cc) is missing: a few voxels at a border where
    # it won the argmax, not a contour (a model-grid voxel of 2.5 x 2.5 x 3 mm is 0.02 cc).
    min_drawn_cc: float = 0.5
    # Per-structure confidence: uncertain voxels of a structure's own probability (``uncertain_band``) per voxel
    # of the structure above which it is flagged: the 80th percentile of the right structures (> 5 cc) of the
    # shipped bundle (v5) on the same 20 calibration phantoms (34 right: 0.31-1.65; 4 wrong: 1.07-4.13).
    # Small structures have more border per volume, so their ratios run higher than the CTV's.
    max_structure_uncertain_ratio: float = 1.30
    # Structures at or below this volume (cc) get no confidence flag: their ratio is all border.
    min_confidence_cc: float = 5.0
    # Per-structure "left out" (``structure_confidence_reasons``): the voxels outside the whole contour that the
    # model still gives structure k a probability above ``uncertain_band[0]`` (so 0.2 up to the CTV threshold), per
    # voxel of k drawn. A bundle calibrated with ``left_out_reference`` ({structure: the median of that ratio over
    # its right structures on the calibration cases}) flags a structure whose ratio is above this multiple of its
    # own reference: it may be drawn too small, the clinically wrong contours' failure (a region covered by less
    # than half). Each structure against its own usual: on the v12 and v13 bundles the left nodal levels leave out up
    # to 3 times as much as the right ones on right contours, so one threshold for all flagged left level 3 for
    # its kind.
    # 2: a median is stable on 20-40 calibration cases where a high quantile is not (docs/results.md).
    max_left_out_factor: float = 2.0
    left_out_reference: Mapping[str, float] | None = None
    # Removed by the anatomical range step (cc) above which the clinician is told: a few cc are partial-volume
    # crumbs at a limit; more means the model painted outside the target region and may have erred inside it.
    max_dropped_cc: float = 5.0
    # A side the note calls a mastectomy whose CT shows a breast mound (``inference.anatomy``: body in front of
    # the skin over the sternum) of at least this many cc and this multiple of the other side's (or of nothing,
    # when the note calls both sides mastectomies): the note and the CT disagree on the side or the surgery.
    # On the 82 planning-FOV test phantoms (internal 32, external 30, arms-down 20) an operated side shows
    # 4-55 cc, at most 0.24 times the other side's; an intact or conserved breast 86-472 cc.
    min_mound_cc: float = 70.0
    mound_ratio: float = 2.0

    @classmethod
    def for_bundle(cls, review: Mapping | None) -> "ReviewConfig":
        """The defaults, with the thresholds a bundle records for itself (``InferenceConfig.review``: calibrated
        on that model by ``bench/review_flags.py --calibrate K --save``). Other keys (the calibration's
        provenance) are left alone; a value that is not a positive number is refused."""
        values = {}
        for key in set(BUNDLE_THRESHOLDS) & set(review or {}):
            values[key] = _positive(review[key], f"the bundle's review threshold {key}")
        reference = (review or {}).get("left_out_reference")
        if reference is not None:
            if not isinstance(reference, Mapping) or not reference:
                raise ValueError(f"the bundle's left_out_reference is {reference!r}; it must map structures to numbers")
            values["left_out_reference"] = {str(name): _positive(v, f"the bundle's left_out_reference of {name}")
                                            for name, v in reference.items()}
        return replace(cls(), **values)


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} is {value!r}; it must be a positive number")
    return float(value)


#: ReviewConfig fields a bundle may set for itself: the confidence thresholds, which depend on the model.
BUNDLE_THRESHOLDS = ("max_uncertain_ratio", "max_structure_uncertain_ratio", "max_left_out_factor")


@dataclass(frozen=True)
class Reason:
    kind: str  # "input", "confidence", "volume", ...
    text: str  # one line for a clinician, with numbers and units
    structure: str | None = None  # None: the whole contour

    def line(self) -> str:
        return f"{self.structure}: {self.text}" if self.structure else self.text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "structure": self.structure, "text": self.text}


@dataclass
class Review:
    reasons: list[Reason] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why (no flag)
    measures: dict = field(default_factory=dict)  # the numbers the checks used

    @property
    def needs_review(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict:
        return {"needs_review": self.needs_review, "reasons": [r.line() for r in self.reasons],
                "flags": [r.to_dict() for r in self.reasons], "notes": list(self.notes),
                "measures": self.measures}


# -- input outside the training range -------------------------------------------------------------

def _mm(v: float) -> str:
    return f"{v:.1f} mm"


def _span(lo: float, hi: float, fmt=_mm) -> str:
    return fmt(lo) if abs(hi - lo) < 1e-6 else f"{fmt(lo).split()[0]}-{fmt(hi)}"


def range_reasons(stats: Mapping, trained: Mapping, config: ReviewConfig = ReviewConfig()) -> list[Reason]:
    """One reason per statistic of ``stats`` (``ct_statistics``) outside ``trained`` (``training_range``).
    Spacing is flagged only when coarser than trained: a finer CT is resampled to the model's grid and
    loses nothing the model was trained with."""
    rel, out = config.relative_tolerance, []
    if "spacing_mm" in trained and stats.get("spacing_mm"):
        for axis, value, (lo, hi) in zip(AXES, stats["spacing_mm"], trained["spacing_mm"]):
            if value > hi * (1 + rel):
                what = "slices are" if axis == "S-I" else f"voxels are, {axis},"
                advice = "a CT with thinner slices" if axis == "S-I" else "a CT with a finer pixel grid"
                out.append(Reason("input", f"{what} {_mm(value)} apart; this model was trained on {_span(lo, hi)}: "
                                           f"check the contour, or give {advice}"))
    if "fov_mm" in trained and stats.get("fov_mm"):
        for axis, value, (lo, hi) in zip(AXES, stats["fov_mm"], trained["fov_mm"]):
            if value < lo * (1 - rel):
                out.append(Reason("input", f"the CT covers {value:.0f} mm {axis}; this model was trained on CTs "
                                           f"covering {lo:.0f}-{hi:.0f} mm: part of the target may lie outside it"))
            elif value > hi * (1 + rel):
                out.append(Reason("input", f"the CT covers {value:.0f} mm {axis}; this model was trained on CTs "
                                           f"covering {lo:.0f}-{hi:.0f} mm: check for contour in anatomy it has "
                                           f"not seen (e.g. neck or abdomen)"))
    for key, label in (("body_width_mm", "wide (R-L)"), ("body_depth_mm", "deep (A-P)")):
        if key in trained and stats.get(key) is not None:
            lo, hi = trained[key]
            value = stats[key]
            if not lo * (1 - rel) <= value <= hi * (1 + rel):
                out.append(Reason("input", f"the patient is {value:.0f} mm {label}; this model was trained on "
                                           f"{lo:.0f}-{hi:.0f} mm: check the contour"))
    for p, label in ((1, "1st"), (50, "median"), (99, "99th")):
        key = f"hu_p{p}"
        if key in trained and stats.get(key) is not None:
            lo, hi = trained[key]
            value = stats[key]
            if not lo - config.hu_tolerance <= value <= hi + config.hu_tolerance:
                out.append(Reason("input", f"the {label} percentile of body HU is {value:.0f} HU; this model was "
                                           f"trained on {lo:.0f} to {hi:.0f} HU: check the CT's calibration or "
                                           f"contrast, and the contour"))
    return out


# -- confidence -----------------------------------------------------------------------------------

def uncertain_ratio(probability: np.ndarray, mask: np.ndarray, band=(0.2, 0.8)) -> float | None:
    """Voxels with probability strictly inside ``band`` per voxel of ``mask`` (None for an empty mask)."""
    contour = int(np.count_nonzero(mask))
    if contour == 0:
        return None
    lo, hi = band
    uncertain = int(np.count_nonzero((probability > lo) & (probability < hi)))
    return uncertain / contour


def surface_cm2(mask: np.ndarray, spacing_zyx) -> float:
    """Area of the mask's boundary (voxel faces between inside and outside, and at the array's edge)."""
    area = 0.0
    for axis in range(3):
        faces = np.count_nonzero(np.diff(mask, axis=axis, prepend=False, append=False))
        area += faces * float(np.prod([s for i, s in enumerate(spacing_zyx) if i != axis]))
    return area / 100.0


def confidence_reason(ratio: float | None, config: ReviewConfig = ReviewConfig(),
                      structure: str | None = None) -> Reason | None:
    if ratio is None or ratio <= config.max_uncertain_ratio:
        return None
    lo, hi = config.uncertain_band
    return Reason("confidence", f"the model is unsure: {100 * ratio:.0f} uncertain voxels (probability "
                                f"{lo:g}-{hi:g}) per 100 contour voxels, above {100 * config.max_uncertain_ratio:.0f}:"
                                f" check the contour's borders and the nodal levels", structure)


# -- volume ---------------------------------------------------------------------------------------

def volume_reason(volume_cc: float, note: ClinicalNote, config: ReviewConfig = ReviewConfig(),
                  structure: str | None = None) -> Reason | None:
    sides = max(1, len(note.sides))
    lo, hi = config.min_cc_per_side * sides, config.max_cc_per_side * sides
    per = "" if sides == 1 else f" for {sides} treated sides"
    if volume_cc <= 0:
        return Reason("volume", "the contour is empty: the model drew no target for this note; "
                                "contour by hand or check the note and the CT", structure)
    if volume_cc < lo:
        return Reason("volume", f"the contour is {volume_cc:.0f} cc, less than the {lo:.0f} cc of the smallest "
                                f"plausible CTV{per}: the target is probably incomplete", structure)
    if volume_cc > hi:
        return Reason("volume", f"the contour is {volume_cc:.0f} cc, more than the {hi:.0f} cc of the largest "
                                f"plausible CTV{per}: it has probably spread beyond the target", structure)
    return None


# -- the whole contour ----------------------------------------------------------------------------

def review_contour(image: sitk.Image, probability: sitk.Image, mask: sitk.Image, note: ClinicalNote,
                   training: Mapping | None, preprocessing=None, config: ReviewConfig = ReviewConfig(),
                   anatomical_range: Mapping | None = None, input_notes: list[str] = (),
                   ct_stats: Mapping | None = None) -> Review:
    """The review of one contour (``mask``, its ``probability`` on the CT's grid) of ``image`` for
    ``note``, by a bundle whose training block is ``training``; ``anatomical_range`` is the report of
    ``inference.anatomy`` (what it removed), ``input_notes`` what preprocessing noticed about the CT,
    ``ct_stats`` the CT's ``ct_statistics`` when the caller has them already (a note edit, same CT)."""
    review = Review()
    review.notes += list(input_notes)
    reason = dropped_reason(anatomical_range or {}, config)
    if reason is not None:
        review.reasons.append(reason)
    mounds = (anatomical_range or {}).get("breast_mound_cc")
    if mounds:
        review.measures["breast_mound_cc"] = dict(mounds)
        review.reasons += mound_reasons(mounds, note, config)
    else:
        review.notes.append("no lungs found in the CT (or the range step was off): the note's surgery was not "
                            "checked against the breast mounds the CT shows")
    if ct_stats is not None:
        stats = dict(ct_stats)
    else:
        stats = ct_statistics(image) if preprocessing is None else ct_statistics(image, preprocessing)
    trained = (training or {}).get("ct_range") or {}
    review.measures["ct"] = stats
    if trained:
        review.reasons += range_reasons(stats, trained, config)
    else:
        review.notes.append("the bundle records no training range of CTs (trained before it was recorded): "
                            "the CT was not checked against it")
    p = sitk.GetArrayViewFromImage(probability)
    m = sitk.GetArrayViewFromImage(mask) > 0
    volume_cc = float(np.count_nonzero(m)) * float(np.prod(mask.GetSpacing())) / 1000.0
    ratio = uncertain_ratio(p, m, config.uncertain_band)
    voxel_cc = float(np.prod(mask.GetSpacing())) / 1000.0
    lo, hi = config.uncertain_band
    uncertain_cc = float(np.count_nonzero((p > lo) & (p < hi))) * voxel_cc
    surface = surface_cm2(m, mask.GetSpacing()[::-1]) if ratio is not None else 0.0
    review.measures.update(volume_cc=round(volume_cc, 2),
                           uncertain_ratio=None if ratio is None else round(ratio, 4),
                           uncertain_cc=round(uncertain_cc, 2),
                           uncertain_mm=round(10 * uncertain_cc / surface, 3) if surface else None)
    if config.left_out_reference is not None:
        # how much of the contour is border depends on which structures the note calls for (a chest wall and
        # nodal levels are mostly border, a breast is not): one threshold would flag node-positive mastectomies
        # for their shape; each structure is judged against its own reference instead
        review.notes.append("confidence is judged per structure, each against what the model leaves out of it on "
                            "right contours; the whole contour's uncertain ratio is measured, not flagged")
        whole = None
    else:
        whole = confidence_reason(ratio, config)
    for reason in (volume_reason(volume_cc, note, config), whole):
        if reason is not None:
            review.reasons.append(reason)
    return review


def mound_reasons(mounds: Mapping[str, float], note: ClinicalNote, config: ReviewConfig = ReviewConfig()) -> list[Reason]:
    """Note against CT (kind "note"): a side the note calls a mastectomy where the CT shows a breast mound
    (``mounds``: cc per side, ``inference.anatomy``) of at least ``min_mound_cc`` and ``mound_ratio`` times
    the other side's. Only this direction is checked: CT cannot tell a conserved breast from an intact one,
    and a small one lies nearly flat; a mound where the note says mastectomy is the note's side or surgery
    being wrong, or a reconstruction (which the line names)."""
    reasons = []
    for s in note.sides:
        if s.surgery != "mastectomy":
            continue
        other = other_side(s.side)
        here, there = float(mounds.get(s.side, 0.0)), float(mounds.get(other, 0.0))
        other_findings = note.findings(other)
        compare = 0.0 if other_findings is not None and other_findings.surgery == "mastectomy" else there
        if here >= config.min_mound_cc and here >= config.mound_ratio * compare:
            reasons.append(Reason("note", (
                f"the note says {SURGERY_PROMPT['mastectomy']} on the {s.side} side, but the CT shows a breast mound "
                f"there: {here:.0f} cc in front of the chest, {there:.0f} cc on the {other} side (flagged from "
                f"{config.min_mound_cc:.0f} cc and {config.mound_ratio:g} times the other side): check the note's "
                "side and surgery (a reconstructed breast also shows a mound)")))
    return reasons


# -- per structure: does the contour agree with the note? ---------------------------------------

def _side_why(name: str, note: ClinicalNote) -> str:
    """Why the note's guideline leaves structure ``name`` out, for a clinician."""
    _, side = structure_for(name)
    s = note.findings(side) if side else None
    if s is None:
        return f"the note treats only the {' and '.join(f.side for f in note.sides)} side"
    why = f"{s.n_stage}, {SURGERY_PROMPT[s.surgery]}"
    if is_nodal_structure(name) and not s.node_positive:
        why += ": no nodal levels" if s.n_stage == "N0" else ": N1mi is treated as N0, no nodal levels"
    return f"the note's guideline for the {side} side ({why}) does not include it"


def _breast_after_mastectomy(name: str, note: ClinicalNote) -> str | None:
    """The side, when ``name`` is a breast structure on a side the note calls a mastectomy; else None."""
    row, side = structure_for(name)
    s = note.findings(side) if side else None
    return side if s is not None and s.surgery == "mastectomy" and row is not None and "breast" in row.regions \
        else None


def structure_reasons(volumes: Mapping[str, float], expected, note: ClinicalNote, training: Mapping | None,
                      config: ReviewConfig = ReviewConfig()) -> list[Reason]:
    """Note consistency per structure (kind "note"): ``volumes`` {structure: cc} as drawn, for every structure
    the bundle has (0 for those it did not draw; ``ContourResult.structure_volumes()``), ``expected`` the
    structures the note's guideline calls for (``note.targets.structures_for_note``).

    Flagged: a structure the guideline excludes with more than ``max_excluded_cc``; one it calls for with
    less than ``min_drawn_cc`` (missing), or below ``min_share_of_trained`` of the smallest seen in training
    (``training["structures"]["volume_cc"]`` = {name: [min, median, max]}), or above ``max_times_trained``
    times the largest. An expected structure that is
    not in ``volumes`` is one the bundle cannot draw: not flagged here."""
    expected = set(expected)
    trained = ((training or {}).get("structures") or {}).get("volume_cc") or {}
    out = []
    for name, cc in volumes.items():
        cc = float(cc)
        if name not in expected:
            if cc <= config.max_excluded_cc:
                continue
            mastectomy_side = _breast_after_mastectomy(name, note)
            # a breast where the note says mastectomy: the model draws the breast it sees on the CT, so the
            # note's side or surgery disagrees with the CT; anything else excluded is the model's to delete
            why = (f"of breast drawn where the note says total mastectomy ({mastectomy_side} side): the CT seems to "
                   "show a breast there; check the note's side and surgery" if mastectomy_side else
                   f"drawn, but {_side_why(name, note)}: delete it or check the note")
            out.append(Reason("note", f"{cc:.0f} cc {why}", name))
        elif cc < config.min_drawn_cc:
            drawn = "none" if cc <= 0 else f"only {cc:.2f} cc"
            out.append(Reason("note", f"missing: the note's guideline calls for it but the model drew {drawn}; "
                                      "contour it by hand or check the note", name))
        elif name in trained and cc < config.min_share_of_trained * float(trained[name][0]):
            out.append(Reason("note", f"only {cc:.1f} cc, below {100 * config.min_share_of_trained:.0f} % of the "
                                      f"smallest seen in training ({float(trained[name][0]):.1f} cc): probably "
                                      "incomplete", name))
        elif name in trained and cc > config.max_times_trained * float(trained[name][-1]):
            out.append(Reason("note", f"{cc:.0f} cc, more than {config.max_times_trained:g} times the largest seen in "
                                      f"training ({float(trained[name][-1]):.0f} cc): probably spread beyond the "
                                      "structure; check its borders", name))
    return out


# -- per structure: how sure is the model? --------------------------------------------------------

def structure_confidence_reasons(prob: np.ndarray, classes: Sequence[str], voxel_cc: float,
                                 config: ReviewConfig = ReviewConfig(), threshold: float = 0.5,
                                 drawn: Mapping[str, float] | None = None,
                                 expected: Sequence[str] | None = None) -> tuple[list[Reason], dict]:
    """Confidence per structure (kind "confidence") from the per-structure foreground probabilities ``prob``
    (K, X, Y, Z) on the model grid, ``classes`` their K names, ``voxel_cc`` a model-grid voxel's volume.

    Structure k is the voxels where the union (sum over structures) is at least ``threshold`` (the bundle's
    CTV threshold) and p_k is the largest; its uncertain voxels are those anywhere with p_k strictly inside
    ``config.uncertain_band``. Its left-out voxels are those outside the whole contour with p_k
    above ``uncertain_band[0]``. A structure of more than ``min_confidence_cc`` is flagged:

    * with ``config.left_out_reference`` (a calibrated bundle): when its left-out voxels per structure voxel
      exceed ``max_left_out_factor`` times its reference (a structure without one is measured, not flagged;
      with ``expected``, the structures the note's guideline calls for, only those: one it excludes is the note
      check's, and "drawn too small" would contradict "delete it");
    * without: when its uncertain voxels per structure voxel exceed ``max_structure_uncertain_ratio``.

    ``drawn``: {structure: cc} of the contour as written (on the CT grid, after the anatomical range step):
    a structure is judged by that volume, so one the contour does not hold (the note check calls it missing)
    is never also called "unsure" with a model-grid volume the clinician cannot see.

    Returns (reasons, measures): measures = {structure: {"volume_cc", "uncertain_cc", "uncertain_ratio",
    "left_out_cc", "left_out_ratio"}} for every drawn structure (an empty one is left out)."""
    prob = np.asarray(prob)
    if prob.ndim != 4 or prob.shape[0] != len(classes):
        raise ValueError(f"prob has shape {prob.shape}; expected (K, X, Y, Z) with K = {len(classes)} classes")
    lo, hi = config.uncertain_band
    inside = prob.sum(0) >= threshold
    owner = np.where(inside, prob.argmax(0), -1)
    references = config.left_out_reference
    reasons, measures = [], {}
    for k, name in enumerate(classes):
        n = int(np.count_nonzero(owner == k))
        if n == 0:
            continue
        p = prob[k]
        uncertain = int(np.count_nonzero((p > lo) & (p < hi)))
        left_out = int(np.count_nonzero((p > lo) & ~inside))
        ratio, cc = uncertain / n, n * voxel_cc
        measures[name] = {"volume_cc": round(cc, 2), "uncertain_cc": round(uncertain * voxel_cc, 2),
                          "uncertain_ratio": round(ratio, 4), "left_out_cc": round(left_out * voxel_cc, 2),
                          "left_out_ratio": round(left_out / n, 4)}
        if drawn is not None:
            cc = float(drawn.get(name, 0.0))
        if cc <= config.min_confidence_cc:
            continue
        if references is None:
            if ratio > config.max_structure_uncertain_ratio:
                reasons.append(Reason("confidence", f"the model is unsure of this structure: {100 * ratio:.0f} "
                                                    f"uncertain voxels (probability {lo:g}-{hi:g}) per 100 of its "
                                                    f"{cc:.0f} cc, above {100 * config.max_structure_uncertain_ratio:.0f}"
                                                    ": check its borders", name))
        elif (name in references and (expected is None or name in expected)
              and left_out / n > config.max_left_out_factor * references[name]):
            times = left_out / n / references[name]
            reasons.append(Reason("confidence", f"may be drawn too small: {left_out * voxel_cc:.1f} cc outside the "
                                                f"contour have probability {lo:g}-{threshold:g} of belonging to it, "
                                                f"{times:.1f} times what the model leaves out of it on right contours "
                                                f"(flagged above {config.max_left_out_factor:g}): check whether it "
                                                "should extend further", name))
    return reasons, measures


def dropped_reason(report: Mapping, config: ReviewConfig = ReviewConfig()) -> Reason | None:
    """A reason when the anatomical range step removed more than ``max_dropped_cc``, naming where."""
    dropped = float(report.get("dropped_cc") or 0.0)
    if dropped <= config.max_dropped_cc:
        return None
    where = sorted({c.get("reason", "") for c in report.get("components", []) if c.get("reason")})
    return Reason("anatomical-range", f"{dropped:.1f} cc were removed as outside any breast CTV or nodal level "
                                      f"({', '.join(where) or 'see the anatomical range report'}): the model painted "
                                      "outside the target region; check the rest of the contour too")
