"""The guideline target rules: which structures a clinical note's CTV is made of.

Breast-conserving surgery -> the whole breast; mastectomy -> the chest wall; N1 or more (N1mi counts as
N0) -> also the axillary levels I-III, supraclavicular / level IV and internal mammary nodes, on that
side. ``REGION_LABELS`` are the label values of a sub-region map (the phantoms write one per case; a
hospital's ESTRO structures map onto them), so the truth for any note is ``ctv_for_note(regions, note)``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .clinical import ClinicalNote, note_from_any

REGION_LABELS: dict[str, int] = {
    "breast_left": 1, "breast_right": 2, "chestwall_left": 3, "chestwall_right": 4,
    "axilla_left": 5, "axilla_right": 6, "supraclavicular_left": 7, "supraclavicular_right": 8,
    "internal_mammary_left": 9, "internal_mammary_right": 10,
}
NODAL_REGIONS = ("axilla", "supraclavicular", "internal_mammary")
#: Label values of the nodal levels in REGION_LABELS (what region-weighted training emphasises by default).
NODAL_LABELS = tuple(v for k, v in REGION_LABELS.items() if k.rsplit("_", 1)[0] in NODAL_REGIONS)


def region_names_for_note(note: ClinicalNote, has_breast: Mapping[str, bool] | None = None) -> list[str]:
    """The sub-regions (keys of REGION_LABELS) that the note's CTV is made of (the guideline target rules, docs/method.md).

    Breast-conserving surgery -> the whole breast; mastectomy -> the chest wall; N1 or more (N1mi
    counts as N0) -> also axilla I-III, supraclavicular / level IV and internal mammary, on that side.
    A note asking for a breast on a side whose breast was removed gets that side's chest wall."""
    names = []
    for s in note.sides:
        breast = s.surgery == "bcs" and (has_breast is None or has_breast.get(s.side, True))
        names.append(f"{'breast' if breast else 'chestwall'}_{s.side}")
        if s.node_positive:
            names += [f"{r}_{s.side}" for r in NODAL_REGIONS]
    return names


def ctv_for_note(regions: "sitk.Image | np.ndarray", note: ClinicalNote) -> "sitk.Image | np.ndarray":
    """The guideline CTV that ``note`` (a ClinicalNote, or text / a row note_from_any reads) asks for on
    this anatomy, as uint8 0/1 of the same type and grid as ``regions``."""
    note = note_from_any(note)
    arr = sitk.GetArrayViewFromImage(regions) if isinstance(regions, sitk.Image) else np.asarray(regions)
    present = set(np.unique(arr).tolist())
    has_breast = {s: REGION_LABELS[f"breast_{s}"] in present for s in ("left", "right")}
    labels = [REGION_LABELS[n] for n in region_names_for_note(note, has_breast)]
    mask = np.isin(arr, labels).astype(np.uint8)
    if not isinstance(regions, sitk.Image):
        return mask
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(regions)
    return out
