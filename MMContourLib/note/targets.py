"""The guideline target rules: which structures a clinical note's CTV is made of.

Breast-conserving surgery -> the whole breast; mastectomy -> the chest wall; N1 or more (N1mi counts as
N0) -> also the axillary levels I-III, supraclavicular / level IV and internal mammary nodes, on that
side. ``REGION_LABELS`` are the label values of a sub-region map (the phantoms write one per case; a
hospital's ESTRO structures map onto them), so the truth for any note is ``ctv_for_note(regions, note)``
and, per structure of ``note.structures``, ``structure_masks(regions, note)``.

The axilla is split into ESTRO levels 1-3 (``axilla_l1`` ... ``axilla_l3``); ``axilla`` itself is the
axilla as one region, for maps that do not split it (older phantoms, a hospital's single "Axilla"
structure). Such a region belongs to the CTV but to no one structure (``UNKNOWN_CLASS`` in
``structure_label_map``): training learns it through the union only.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .clinical import ClinicalNote, note_from_any
from .structures import STRUCTURES, Structure, structure_classes, structure_for

REGION_LABELS: dict[str, int] = {
    "breast_left": 1, "breast_right": 2, "chestwall_left": 3, "chestwall_right": 4,
    "axilla_left": 5, "axilla_right": 6, "supraclavicular_left": 7, "supraclavicular_right": 8,
    "internal_mammary_left": 9, "internal_mammary_right": 10,
    "axilla_l1_left": 11, "axilla_l1_right": 12, "axilla_l2_left": 13, "axilla_l2_right": 14,
    "axilla_l3_left": 15, "axilla_l3_right": 16,
}
NODAL_REGIONS = ("axilla", "supraclavicular", "internal_mammary")
#: The parts a region kind is split into (a map may hold the whole or its parts).
REGION_PARTS: dict[str, tuple[str, ...]] = {"axilla": ("axilla_l1", "axilla_l2", "axilla_l3")}
#: In ``structure_label_map``: a voxel of the note's CTV whose structure the map cannot tell (an unsplit axilla).
UNKNOWN_CLASS = 255


def region_kind(key: str) -> str:
    """"axilla_l1_left" -> "axilla_l1"."""
    return key.rsplit("_", 1)[0]


def labels_of(name: str) -> list[int]:
    """The label values of region ``name`` (a REGION_LABELS key) and of its parts: "axilla_left" ->
    [5, 11, 13, 15]."""
    kind, side = name.rsplit("_", 1)
    return [REGION_LABELS[name]] + [REGION_LABELS[f"{part}_{side}"] for part in REGION_PARTS.get(kind, ())]


#: The region kinds of the nodal levels: the nodal regions and their parts ("axilla", "axilla_l1", ...).
NODAL_KINDS = NODAL_REGIONS + tuple(p for r in NODAL_REGIONS for p in REGION_PARTS.get(r, ()))
#: Label values of the nodal levels in REGION_LABELS (what region-weighted training emphasises by default).
NODAL_LABELS = tuple(v for k, v in REGION_LABELS.items() if region_kind(k) in NODAL_KINDS)


def is_nodal_structure(name: str) -> bool:
    """Whether structure ``name`` (a row of ``note.structures`` with its side) is a nodal level: made of
    NODAL_KINDS regions."""
    row, _ = structure_for(name)
    return bool(row and set(row.regions) & set(NODAL_KINDS))


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
    labels = [v for n in region_names_for_note(note, _has_breast(arr)) for v in labels_of(n)]
    return _like(regions, np.isin(arr, labels).astype(np.uint8))


def _has_breast(arr: np.ndarray) -> dict[str, bool]:
    present = set(np.unique(arr).tolist())
    return {s: REGION_LABELS[f"breast_{s}"] in present for s in ("left", "right")}


def _like(regions, array: np.ndarray):
    if not isinstance(regions, sitk.Image):
        return array
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(regions)
    return out


def region_structure(key: str, table: Mapping[str, Structure] | None = None) -> str | None:
    """The structure (with its side suffix) a region belongs to: "axilla_l1_left" -> "CTVn_L1_L";
    a region no row is made of ("axilla_left", unsplit) -> None."""
    kind, side = key.rsplit("_", 1)
    for row in (table or STRUCTURES).values():
        if kind in row.regions:
            return row.name_for(side)
    return None


def structures_for_note(note: ClinicalNote, has_breast: Mapping[str, bool] | None = None,
                        table: Mapping[str, Structure] | None = None) -> list[str]:
    """The structures (names with side) the note's guideline CTV is made of, e.g. N0 after BCS on the
    left -> ["CTVp_Breast_L"]; N1 -> also "CTVn_L1_L" ... "CTVn_IMN_L"."""
    names = []
    for region in region_names_for_note(note, has_breast):
        kind, side = region.rsplit("_", 1)
        for part in REGION_PARTS.get(kind, (kind,)):
            name = region_structure(f"{part}_{side}", table)
            if name and name not in names:
                names.append(name)
    return names


def structure_label_map(regions: "sitk.Image | np.ndarray", note: ClinicalNote,
                        classes: tuple[str, ...] | None = None) -> "sitk.Image | np.ndarray":
    """The training target of ``note`` on this anatomy as class indices (uint8, same type and grid as
    ``regions``): 1 + the position in ``classes`` (default ``structure_classes()``) of each voxel's
    structure where the note's guideline CTV is, ``UNKNOWN_CLASS`` where the CTV's region belongs to
    no class (an unsplit axilla, or a structure the classes lack), 0 elsewhere."""
    note = note_from_any(note)
    classes = tuple(classes or structure_classes())
    arr = sitk.GetArrayViewFromImage(regions) if isinstance(regions, sitk.Image) else np.asarray(regions)
    lut = np.zeros(256, np.uint8)
    for region in region_names_for_note(note, _has_breast(arr)):
        for value in labels_of(region):
            key = next(k for k, v in REGION_LABELS.items() if v == value)
            name = region_structure(key)
            lut[value] = classes.index(name) + 1 if name in classes else UNKNOWN_CLASS
    return _like(regions, lut[arr.astype(np.uint8)])


def structure_masks(regions: "sitk.Image | np.ndarray", note: ClinicalNote,
                    classes: tuple[str, ...] | None = None) -> dict:
    """The guideline truth per structure of ``classes`` for ``note``: {name: uint8 0/1 mask} (same type and
    grid as ``regions``), the structures the note excludes included as empty masks."""
    classes = tuple(classes or structure_classes())
    label = structure_label_map(regions, note, classes)
    arr = sitk.GetArrayViewFromImage(label) if isinstance(label, sitk.Image) else label
    return {name: _like(regions, (arr == i + 1).astype(np.uint8)) for i, name in enumerate(classes)}
