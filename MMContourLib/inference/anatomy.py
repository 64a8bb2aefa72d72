"""The anatomical range check: nothing is contoured where no breast CTV or nodal level can lie.

The limits come from the CT itself, never from the model: the body is the largest component above
``BODY_HU``; the lungs are the large air-density components inside it whose median HU is that of lung
parenchyma (so stomach and bowel gas, all near -1000 HU, are not lungs). Then

- caudal limit = lowest lung voxel (the posterior costophrenic recess) - ``CAUDAL_MARGIN_MM``;
- cranial limit = the lung apices + ``APEX_TO_CRICOID_MM``, an estimate of the cricoid's lower border
  (the ESTRO / RTOG cranial border of level 4). The apices are the highest lung voxels more than
  ``AIRWAY_HALF_WIDTH_MM`` from the body's midline, so that the trachea and larynx, which are one air
  component with the lungs and run up the midline, do not count as lung.

Predicted voxels beyond a limit are removed (a whole component, or the part of one that crosses the
limit), then components farther than ``FAR_MM`` from the main structure (the largest component and
everything within ``FAR_MM`` of it, transitively) are removed. A limit whose landmark is not in the CT
(lungs cut by the field of view) is not applied, and a CT without lungs is left alone: the step never
guesses. Everything removed is reported in cc with its reason. A per-structure contour is also
cleaned per structure (``structure_strays``): a structure's pieces farther than ``FAR_MM`` from the
rest of that structure go, reported with the structure's name.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..image.grid import check_same_grid

BODY_HU = -400.0
LUNG_HU = -400.0                     # air density: lung parenchyma, airways, gas
LUNG_MEDIAN_HU = (-960.0, -600.0)    # parenchyma; gas and the air outside sit at -1000
MIN_LUNG_CC = 150.0
#: No margin: the lowest lung voxel is the posterior costophrenic recess (about T12-L1), several
#: centimetres below the anterior diaphragm and the inframammary fold, so no breast or nodal CTV lies
#: caudal to it (on the 190 planning-FOV phantoms the CTV ends 20-70 mm above it). A removal there is
#: reported and, above a few cc, flagged for review, so an unusual patient is shown, not silently cut.
CAUDAL_MARGIN_MM = 0.0
#: The cricoid's lower border (C6) lies about two vertebral levels above the lung apices (T1).
APEX_TO_CRICOID_MM = 30.0
AIRWAY_HALF_WIDTH_MM = 20.0
#: The skin over the sternum, the plane a breast mound is measured from, is the most anterior body point
#: within this distance of the midline.
MIDLINE_HALF_WIDTH_MM = 10.0
#: Largest gap between the parts of one guideline CTV (left and right breast of a bilateral case across
#: the sternum, internal mammary nodes inside the rib cage); a component farther away is not part of it.
FAR_MM = 40.0

CAUDAL, CRANIAL, FAR = "caudal to the lung bases", "cranial to the cricoid", "far from the target"


def _coordinates(image: sitk.Image, stride: tuple[int, int, int], box: tuple[slice, ...] | None = None,
                 rows: tuple[int, ...] = (0, 2)):
    """Physical LPS coordinates (mm; ``rows``: 0 x, 1 y, 2 z; default x and z) of the voxels of ``image``'s
    array taken with ``stride`` (z, y, x), or of the voxels of the array's sub-box ``box`` (slices in z, y, x)."""
    n = image.GetDimension()
    matrix = np.asarray(image.GetDirection(), float).reshape(n, n) * np.asarray(image.GetSpacing(), float)
    size = image.GetSize()
    if box is None:
        box = tuple(slice(0, size[2 - a]) for a in range(3))
    idx = [np.arange(box[2 - a].start, box[2 - a].stop, stride[2 - a], dtype=np.float32) for a in range(3)]  # i, j, k
    out = []
    for row in rows:
        m, o = matrix[row], float(image.GetOrigin()[row])
        out.append(np.float32(o) + np.float32(m[0]) * idx[0][None, None, :] + np.float32(m[1]) * idx[1][None, :, None]
                   + np.float32(m[2]) * idx[2][:, None, None])
    return out


def find_limits(ct: sitk.Image) -> dict:
    """``{"caudal", "cranial", "lung_base", "lung_apex"}`` in LPS z mm (None where the CT does not show
    the landmark), plus ``"notes"``; ``{"lungs": False, "reason": ...}`` when it shows no lungs."""
    from scipy import ndimage

    direction = np.asarray(ct.GetDirection(), float).reshape(3, 3)
    if abs(direction[2, 2]) < 0.85:
        return {"lungs": False, "reason": "the CT's slices are not axial: the anatomical range was not checked"}
    spacing = np.asarray(ct.GetSpacing(), float)
    s = max(1, int(3.0 // min(spacing[0], spacing[1])))  # about 3 mm in plane is plenty for lungs and body
    stride = (1, s, s)
    hu = sitk.GetArrayViewFromImage(ct)[:, ::s, ::s]
    voxel_cc = float(np.prod(spacing * [s, s, 1])) / 1000.0
    labels, n = ndimage.label(hu > BODY_HU)
    if n == 0:
        return {"lungs": False, "reason": "no body in the CT: the anatomical range was not checked"}
    body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    inside = np.stack([ndimage.binary_fill_holes(b) for b in body])  # per slice: the airway opens to the outside
    air = inside & (hu < LUNG_HU)
    # a one-voxel erosion cuts the partial-volume bridges through a thin diaphragm to the gas in the stomach
    core = ndimage.binary_erosion(air)
    labels, n = ndimage.label(core)
    lungs = np.zeros(air.shape, bool)
    if n:
        index = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(core, labels, index) * voxel_cc
        for i in index[sizes >= MIN_LUNG_CC]:
            part = labels == i
            if LUNG_MEDIAN_HU[0] < float(np.median(hu[part])) < LUNG_MEDIAN_HU[1]:
                lungs |= part
        lungs = air & ndimage.binary_dilation(lungs)
    if not lungs.any():
        return {"lungs": False, "reason": f"no lungs in the CT (no air-density region of >= {MIN_LUNG_CC:.0f} cc "
                                          "with lung HU inside the body): the anatomical range was not checked"}
    x, y, z = _coordinates(ct, stride, rows=(0, 1, 2))
    z_l = np.broadcast_to(z, lungs.shape)[lungs]
    caudal_k = 0 if direction[2, 2] > 0 else lungs.shape[0] - 1
    notes, limits = [], {"lungs": True}
    if lungs[caudal_k].any():
        limits["lung_base"] = limits["caudal"] = None
        notes.append("the lungs reach the CT's caudal edge: no caudal limit")
    else:
        limits["lung_base"] = round(float(z_l.min()), 1)
        limits["caudal"] = round(limits["lung_base"] - CAUDAL_MARGIN_MM, 1)
    x_mid = float(np.median(np.broadcast_to(x, body.shape)[body]))
    lateral = lungs & (np.abs(x - x_mid) > AIRWAY_HALF_WIDTH_MM)
    if lungs[lungs.shape[0] - 1 - caudal_k].any() or not lateral.any():
        limits["lung_apex"] = limits["cranial"] = None
        notes.append("the lungs reach the CT's cranial edge: no cranial limit")
    else:
        limits["lung_apex"] = round(float(np.broadcast_to(z, lungs.shape)[lateral].max()), 1)
        limits["cranial"] = round(limits["lung_apex"] + APEX_TO_CRICOID_MM, 1)
    limits["notes"] = notes
    limits["breast_mound_cc"] = _breast_mounds(body, lungs, x, y, x_mid, voxel_cc)
    return limits


def _breast_mounds(body, lungs, x, y, x_mid: float, voxel_cc: float) -> dict[str, float]:
    """Per side, the body (cc) in front of the skin over the sternum, between the midline and the lung's lateral
    edge, on the slices that show lung: a breast lying on the chest. After a mastectomy the chest wall lies
    at or behind that plane (the 82 planning-FOV test phantoms: 4-55 cc on an operated side, 86-472 cc for
    an intact or conserved breast). The arms lie lateral to the lungs and are left out."""
    y_full = np.broadcast_to(y, body.shape)
    x_full = np.broadcast_to(x, body.shape)
    near = body & (np.abs(x_full - x_mid) < MIDLINE_HALF_WIDTH_MM)
    skin = np.where(near, y_full, np.inf).min(axis=(1, 2))  # per slice; LPS y grows to the back
    lung_x = np.where(lungs, x_full, np.nan)
    shown = lungs.any(axis=(1, 2)) & np.isfinite(skin)
    out = {"left": 0.0, "right": 0.0}
    if not shown.any():
        return out
    with np.errstate(all="ignore"):
        lo = np.nanmin(lung_x[shown], axis=(1, 2))[:, None, None]
        hi = np.nanmax(lung_x[shown], axis=(1, 2))[:, None, None]
    xs = x_full[shown]
    front = body[shown] & (y_full[shown] < skin[shown][:, None, None]) & (xs >= lo) & (xs <= hi)
    out["left"] = round(float(np.count_nonzero(front & (xs > x_mid))) * voxel_cc, 1)   # LPS x grows to the left
    out["right"] = round(float(np.count_nonzero(front & (xs < x_mid))) * voxel_cc, 1)
    return out


def _far_components(labels: np.ndarray, n: int, sizes: np.ndarray, spacing_zyx) -> list[int]:
    """Labels of the components farther than FAR_MM from the main structure (the largest component and
    what lies within FAR_MM of it, transitively). Distances are between voxel centres of the components'
    surfaces (the nearest voxel of a set to another always lies on its surface), with a k-d tree: a
    distance transform of the whole box took seconds on a clinical CT."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    if n < 2:
        return []
    surface = (labels > 0) & ~ndimage.binary_erosion(labels > 0)
    where = np.nonzero(surface)
    owner = labels[where]
    points = np.stack(where, axis=1).astype(np.float32) * np.asarray(spacing_zyx, np.float32)
    parts = {i: points[owner == i] for i in range(1, n + 1)}
    kept = {int(np.argmax(sizes)) + 1}
    rest = set(range(1, n + 1)) - kept
    while rest:
        tree = cKDTree(np.concatenate([parts[i] for i in kept]))
        near = {i for i in rest
                if np.isfinite(tree.query(parts[i], k=1, distance_upper_bound=FAR_MM * (1 + 1e-6))[0]).any()}
        if not near:
            break
        kept |= near
        rest -= near
    return sorted(rest)


def anatomical_range(ct: sitk.Image, mask: sitk.Image, limits: dict | None = None) -> tuple[sitk.Image, dict]:
    """``(cleaned mask, report)``: ``mask`` (0/1 on ``ct``'s grid) without what lies where no breast CTV or
    nodal level can. The report: ``applied``, ``dropped_cc``, ``components`` (``cc``, ``reason``,
    ``clipped``: only the part beyond a limit went), ``limits_mm``, and ``reason`` when not applied.
    ``limits``: ``find_limits(ct)`` when the caller has it already (a note edit on the same CT)."""
    from scipy import ndimage

    check_same_grid(mask, ct, "the mask is not on the CT's grid")
    limits = dict(find_limits(ct) if limits is None else limits)
    report = {"applied": False, "dropped_cc": 0.0, "components": [], "limits_mm": {}}
    if not limits.pop("lungs"):
        report["reason"] = limits["reason"]
        return mask, report
    report["breast_mound_cc"] = limits.pop("breast_mound_cc", None)
    report.update(applied=True, notes=limits.pop("notes"),
                  limits_mm={**limits, "caudal_margin": CAUDAL_MARGIN_MM, "apex_to_cricoid": APEX_TO_CRICOID_MM},
                  far_mm=FAR_MM)
    whole_mask = sitk.GetArrayFromImage(mask) > 0
    if not whole_mask.any():
        return mask, report
    box = ndimage.find_objects(whole_mask.view(np.uint8))[0]  # everything below happens inside the mask's box
    m = whole_mask[box].copy()
    spacing = mask.GetSpacing()
    voxel_cc = float(np.prod(spacing)) / 1000.0
    spacing_zyx = (spacing[2], spacing[1], spacing[0])
    structure = np.ones((3, 3, 3), bool)
    labels, n = ndimage.label(m, structure)
    _x, z = _coordinates(mask, (1, 1, 1), box)
    z = np.broadcast_to(z, m.shape)
    outside = {CAUDAL: z < limits["caudal"] if limits["caudal"] is not None else None,
               CRANIAL: z > limits["cranial"] if limits["cranial"] is not None else None}
    removed = np.zeros(m.shape, bool)
    whole = np.bincount(labels.ravel(), minlength=n + 1)
    for reason, beyond in outside.items():
        if beyond is None:
            continue
        hit = m & beyond & ~removed
        if not hit.any():
            continue
        gone = np.bincount(labels[hit], minlength=n + 1)
        for i in np.nonzero(gone)[0]:
            report["components"].append({"cc": round(float(gone[i]) * voxel_cc, 2), "reason": reason,
                                         "clipped": bool(gone[i] < whole[i])})
        removed |= hit
    if removed.any():
        m &= ~removed
        labels, n = ndimage.label(m, structure)
        whole = np.bincount(labels.ravel(), minlength=n + 1)
    if n > 1:
        sizes = whole[1:]
        for i in _far_components(labels, n, sizes, spacing_zyx):
            report["components"].append({"cc": round(float(sizes[i - 1]) * voxel_cc, 2), "reason": FAR, "clipped": False})
            m[labels == i] = False
    report["dropped_cc"] = round(sum(c["cc"] for c in report["components"]), 2)
    if not report["components"]:
        return mask, report
    whole_mask[box] = m
    out = sitk.GetImageFromArray(whole_mask.astype(sitk.GetArrayViewFromImage(mask).dtype))
    out.CopyInformation(mask)
    return out, report


def structure_strays(labels: sitk.Image, classes) -> tuple[sitk.Image, list[dict]]:
    """Per structure of a per-structure contour (``labels``: 1 + class index on the CT grid), the parts far
    from the rest of that structure: a structure's components farther than ``FAR_MM`` from its main part
    (its largest component and what lies within ``FAR_MM`` of it) are removed (from the whole contour too:
    a piece of a left axillary level in the right axilla is no part of any target). Returns the labels
    and one report entry per removed component (``cc``, ``reason`` naming the structure)."""
    from scipy import ndimage

    arr = sitk.GetArrayFromImage(labels)
    spacing = labels.GetSpacing()
    voxel_cc = float(np.prod(spacing)) / 1000.0
    spacing_zyx = (spacing[2], spacing[1], spacing[0])
    structure = np.ones((3, 3, 3), bool)
    removed = []
    for value, box in enumerate(ndimage.find_objects(arr), start=1):
        if box is None or value > len(classes):
            continue
        part = arr[box] == value
        comp, n = ndimage.label(part, structure)
        if n < 2:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        for i in _far_components(comp, n, sizes, spacing_zyx):
            removed.append({"cc": round(float(sizes[i - 1]) * voxel_cc, 2), "clipped": False,
                            "reason": f"far from the rest of {classes[value - 1]}", "structure": classes[value - 1]})
            arr[box][comp == i] = 0
    if not removed:
        return labels, []
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out, removed


def cc_caudal_to(mask: sitk.Image, z_mm: float | None) -> float | None:
    """Volume (cc) of ``mask`` caudal to the axial plane at LPS z = ``z_mm`` (None when ``z_mm`` is None: the
    CT did not show the landmark). Evaluation uses it with the lung base: what a contour still holds below it."""
    if z_mm is None:
        return None
    from scipy import ndimage

    arr = sitk.GetArrayViewFromImage(mask) > 0
    if not arr.any():
        return 0.0
    box = ndimage.find_objects(arr.view(np.uint8))[0]  # coordinates of the mask's box only, as the range step
    _x, z = _coordinates(mask, (1, 1, 1), box)
    below = arr[box] & (np.broadcast_to(z, arr[box].shape) < z_mm)
    return round(float(np.count_nonzero(below)) * float(np.prod(mask.GetSpacing())) / 1000.0, 2)


__all__ = ["anatomical_range", "structure_strays", "find_limits", "cc_caudal_to", "CAUDAL_MARGIN_MM", "APEX_TO_CRICOID_MM", "FAR_MM",
           "CAUDAL", "CRANIAL", "FAR"]
