"""What one CT looks like to the model, in numbers a clinician can check, and the range of those
numbers over a training set (recorded in the bundle; the review compares a new CT with it).

Statistics come from the CT as stored (spacing and extent of the original grid, not the model
grid), in patient axes R-L, A-P, S-I whatever the storage order, from a subsample of about
``SAMPLE_MM`` so that a 512 x 512 x 200 CT costs a fraction of a second. Training and prediction
call the same ``ct_statistics``; no torch here.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk

from .preprocess import PreprocessConfig, hu_offset

AXES = ("R-L", "A-P", "S-I")
#: HU above which a voxel is in the body: the model's own body threshold (data/dataset.BODY_THRESHOLD).
BODY_HU = -400.0
PERCENTILES = (1, 50, 99)
SAMPLE_MM = 4.0
#: The body's width and depth are measured per slab of this height (mm), and the median slab is taken:
#: raised arms at the top of the scan or a short slab at its end do not change them.
SLAB_MM = 20.0
#: Plates thinner than this in A-P (mm) are not the patient: the couch's carbon-fibre shells.
COUCH_MM = 12.0
#: Keys of ``ct_statistics`` that hold one value per patient axis.
PER_AXIS = ("spacing_mm", "fov_mm")
STATISTICS = ("spacing_mm", "fov_mm", "hu_p1", "hu_p50", "hu_p99", "body_width_mm", "body_depth_mm")


def _patient_axis_of_storage(direction: np.ndarray) -> list[int]:
    """For each storage axis (i, j, k), the patient axis (0: R-L, 1: A-P, 2: S-I) it runs closest to."""
    return [int(np.argmax(np.abs(direction[:, j]))) for j in range(3)]


def ct_statistics(image: sitk.Image, config: PreprocessConfig = PreprocessConfig()) -> dict:
    """Spacing (mm per patient axis), field of view (mm per patient axis), HU percentiles of the body
    voxels and the body's width (R-L) and depth (A-P) in mm, as plain JSON values."""
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), float)
    size = np.array(image.GetSize())
    axis_of = _patient_axis_of_storage(direction)
    spacing_patient = [0.0, 0.0, 0.0]
    for j, a in enumerate(axis_of):
        spacing_patient[a] = float(spacing[j])
    # field of view: the extent of the voxel boxes (not the centres) along each patient axis
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = (corners * spacing) @ direction.T
    fov = points.max(0) - points.min(0)

    step = np.maximum(1, np.round(SAMPLE_MM / spacing)).astype(int)  # (i, j, k)
    arr = sitk.GetArrayViewFromImage(image)[::step[2], ::step[1], ::step[0]].astype(np.float32)
    arr += hu_offset(image, config)
    body = arr > BODY_HU
    stats = {"spacing_mm": [round(v, 3) for v in spacing_patient], "fov_mm": [round(float(v), 1) for v in fov]}
    if not body.any():
        stats.update({f"hu_p{p}": None for p in PERCENTILES}, body_width_mm=None, body_depth_mm=None)
        return stats
    ap_storage = axis_of.index(1) if 1 in axis_of else 1
    body = _patient(body, 2 - ap_storage, float(step[ap_storage] * spacing[ap_storage]))
    for p, v in zip(PERCENTILES, np.percentile(arr[body], PERCENTILES)):
        stats[f"hu_p{p}"] = round(float(v), 1)
    kji = np.argwhere(body)
    ijk = kji[:, ::-1] * step
    xyz = (ijk * spacing) @ direction.T  # relative to the origin; extents need no offset
    slab = np.floor((xyz[:, 2] - xyz[:, 2].min()) / SLAB_MM).astype(int)
    widths, depths = [], []
    for s in np.unique(slab):
        inside = xyz[slab == s]
        widths.append(np.ptp(inside[:, 0]))
        depths.append(np.ptp(inside[:, 1]))
    stats["body_width_mm"] = round(float(np.median(widths)) + float(step[0] * spacing[0]), 1)
    stats["body_depth_mm"] = round(float(np.median(depths)) + float(step[1] * spacing[1]), 1)
    return stats


def _patient(body: np.ndarray, ap_axis: int, ap_step_mm: float) -> np.ndarray:
    """The patient without the couch. The table top touches the back, so its shells (plates a few mm
    thick in A-P) are cut off first by an opening with a line of ``COUCH_MM`` along A-P (the body's
    lateral walls, tall in A-P, stay whatever their width), then the largest component is grown back
    to the body voxels the opening took from it."""
    from scipy import ndimage

    length = 2 * max(1, int(COUCH_MM / 2 / ap_step_mm)) + 1
    shape = [1, 1, 1]
    shape[ap_axis] = length
    line = np.ones(shape, bool)
    core = ndimage.binary_opening(body, line)
    labels, n = ndimage.label(core)
    if n == 0:
        return body
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = labels == int(np.argmax(counts))
    return ndimage.binary_dilation(largest, line) & body


def training_range(cases: Iterable[Mapping]) -> dict:
    """The range ([min, max], per axis where the statistic has axes) of each statistic over ``cases``
    (``ct_statistics`` dicts); ``cases`` counts the CTs it covers. Empty input gives ``{}``."""
    cases = [c for c in cases if c]
    if not cases:
        return {}
    out: dict = {"cases": len(cases)}
    for key in STATISTICS:
        values = [c.get(key) for c in cases if c.get(key) is not None]
        if not values:
            continue
        if key in PER_AXIS:
            v = np.array(values, float)
            out[key] = [[float(lo), float(hi)] for lo, hi in zip(v.min(0), v.max(0))]
        else:
            out[key] = [float(min(values)), float(max(values))]
    return out
