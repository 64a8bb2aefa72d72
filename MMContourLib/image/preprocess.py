"""CT -> model grid (RAS axes, fixed spacing, HU window scaled to 0..1) and the exact way back.

The model grid is axis-aligned in patient RAS whatever the CT's own storage (LPS, LAS, oblique
direction cosines) and covers the CT's whole physical extent. Predictions go back to the CT's own
grid by resampling *probabilities* with linear interpolation and thresholding afterwards, so the
mask has exactly the CT's size, spacing, origin and direction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

#: RAS axes expressed in ITK's LPS world: x -> -L (= R->L flipped), y -> -P, z -> S.
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


class InputImageError(ValueError):
    """A CT that MMContour cannot contour; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class PreprocessConfig:
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)  # mm along R-L, A-P, S-I (paper: 1 x 1 x 3)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    unsigned_offset: float = -1024.0  # unsigned CT pixels store HU + 1024 (DICOM RescaleIntercept -1024)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        return cls(spacing=tuple(data.get("spacing", cls.spacing)), hu_window=tuple(data.get("hu_window", cls.hu_window)),
                   unsigned_offset=float(data.get("unsigned_offset", cls.unsigned_offset)))


@dataclass
class ModelInput:
    """A CT on the model grid. ``array`` is (X, Y, Z) float32 in 0..1 (X: R->L, Y: A->P, Z: I->S)."""

    array: np.ndarray
    grid: sitk.Image  # geometry of the model grid (pixel values unused)
    source: sitk.Image  # geometry of the CT's own grid
    notes: list[str] = field(default_factory=list)


_UNSIGNED = {sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64}


def hu_offset(image: sitk.Image, config: PreprocessConfig = PreprocessConfig()) -> float:
    """What to add to ``image``'s stored values to get HU: unsigned pixels were stored shifted."""
    return float(config.unsigned_offset) if image.GetPixelID() in _UNSIGNED else 0.0
#: Voxels coarser than this (mm, along any axis) leave a breast CTV a handful of voxels (50 mm voxels: 6):
#: refused. A planning CT has pixels up to ~1.5 mm and slices up to 5 mm; up to MAX_SPACING is contoured
#: with a note (downsampled copies, the tests' coarse phantoms), beyond PLANNING_SPACING the note says so.
MAX_SPACING, PLANNING_SPACING = 10.0, 5.0
#: Direction cosines further than this from orthonormal are a shear (a broken header), not a rotation.
DIRECTION_TOLERANCE = 1e-3


def validate_ct(image: sitk.Image, config: PreprocessConfig = PreprocessConfig()) -> tuple[sitk.Image, list[str]]:
    """Check that ``image`` is a 3D single-channel CT in HU; return it as float32 HU and notes."""
    if not isinstance(image, sitk.Image):
        raise InputImageError(f"expected a SimpleITK image, got {type(image).__name__}")
    notes: list[str] = []
    dim = image.GetDimension()
    if dim != 3:
        raise InputImageError(f"the CT must be a 3D volume; this image is {dim}D (size {image.GetSize()}). "
                              + ("Give the whole series, not one slice." if dim == 2 else
                                 "Split a 4D (e.g. respiratory-phase) series and give one 3D phase."))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"the CT must have one value per voxel; this image has "
                              f"{image.GetNumberOfComponentsPerPixel()} (colour or vector image?)")
    size = image.GetSize()
    if min(size) < 2:
        raise InputImageError(f"the CT is empty or flat (size {size}); a planning CT has many slices")
    spacing = image.GetSpacing()
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise InputImageError(f"the CT has invalid voxel spacing {spacing}")
    voxels = " x ".join(f"{s:g}" for s in spacing)
    if max(spacing) > MAX_SPACING:
        raise InputImageError(
            f"the CT's voxels are {voxels} mm; more than {MAX_SPACING:g} mm along an axis leaves a breast CTV only "
            "a few voxels. Give the original planning CT, not a downsampled or preview copy; if the spacing in the "
            "header is wrong (e.g. cm written as mm), correct it")
    if max(spacing) > PLANNING_SPACING:
        notes.append(f"voxels of {voxels} mm are coarser than a planning CT's (at most {PLANNING_SPACING:g} mm): "
                     "the contour follows this grid; check it, or give the full-resolution CT")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    off = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if off > DIRECTION_TOLERANCE:
        raise InputImageError(
            f"the CT's direction matrix is not orthonormal (off by {off:.3g}, allowed {DIRECTION_TOLERANCE:g}): its "
            "axes are sheared or scaled, which a scanner never writes, and the contour would copy the shear. "
            "Re-export the CT from the scanner or planning system (for DICOM, give the series folder so the slice "
            "positions decide the geometry)")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputImageError(f"the CT has {bad} NaN/infinite voxels; re-export it from the scanner or planning system")
    hu = sitk.Cast(image, sitk.sitkFloat32)
    if hu_offset(image, config):
        hu = hu + hu_offset(image, config)
        notes.append(f"unsigned pixels: added {config.unsigned_offset:+g} to get HU")
    values = sitk.GetArrayViewFromImage(hu)
    sample = values[:: max(1, values.shape[0] // 16), ::4, ::4]
    low, high = np.percentile(sample, [1, 99.5])
    if values.max() - values.min() < 200 or (sample <= -500).mean() < 0.01 or high < -200:
        raise InputImageError(
            f"the image does not look like a CT in Hounsfield units (1st/99.5th percentile {low:.0f}/{high:.0f}; "
            "a thorax CT has air near -1000 HU and soft tissue near 0-100 HU). If it is an MR or a rescaled image, "
            "it cannot be contoured; if it is a CT stored without its rescale slope/intercept, apply them first.")
    return hu, notes


def model_grid_for(image: sitk.Image, config: PreprocessConfig) -> sitk.Image:
    """The RAS-aligned grid at ``config.spacing`` covering every voxel centre of ``image``."""
    size = np.array(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (i, j, k)])
               for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    direction = np.array(RAS_DIRECTION).reshape(3, 3)
    local = np.array(corners) @ direction  # coordinates along the model axes
    lo, hi = local.min(0), local.max(0)
    spacing = np.array(config.spacing, float)
    n = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    grid = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(RAS_DIRECTION)
    grid.SetOrigin([float(v) for v in direction @ lo])
    return grid


def to_model_grid(image: sitk.Image, config: PreprocessConfig = PreprocessConfig(),
                  min_size: tuple[int, int, int] | None = None) -> ModelInput:
    """Validate, reorient and resample a CT to the model grid; HU clipped to the window and scaled to 0..1."""
    hu, notes = validate_ct(image, config)
    grid = model_grid_for(image, config)
    if min_size is not None:
        need = [max(1, m // 2) for m in min_size]
        if any(s < n for s, n in zip(grid.GetSize(), need)):
            mm = [s * sp for s, sp in zip(grid.GetSize(), grid.GetSpacing())]
            raise InputImageError(
                f"the CT covers only {mm[0]:.0f} x {mm[1]:.0f} x {mm[2]:.0f} mm (R-L x A-P x S-I); this model needs "
                f"at least {need[0] * config.spacing[0]:.0f} x {need[1] * config.spacing[1]:.0f} x "
                f"{need[2] * config.spacing[2]:.0f} mm. A breast planning CT covers the whole thorax: is this a crop?")
    lo, hi = config.hu_window
    resampled = sitk.Resample(hu, grid, sitk.Transform(), sitk.sitkLinear, lo, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    arr = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    return ModelInput(np.ascontiguousarray(arr, dtype=np.float32), grid, image, notes)


def model_array_to_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """(X, Y, Z) array on the model grid -> sitk image with the grid's geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    img.CopyInformation(grid)
    return img


def probabilities_to_ct_grid(prob: np.ndarray, model_input: ModelInput) -> sitk.Image:
    """Foreground probabilities (X, Y, Z) on the model grid -> float32 image on the CT's own grid."""
    img = model_array_to_image(prob, model_input.grid)
    return sitk.Resample(img, model_input.source, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def structures_to_ct_grid(prob: np.ndarray, model_input: ModelInput, mask: sitk.Image) -> sitk.Image:
    """Per-structure probabilities (K, X, Y, Z) on the model grid -> uint8 labels on the CT's grid: inside
    ``mask`` (the whole CTV, on the CT grid) 1 + the structure with the highest resampled probability, 0
    outside. Each structure is resampled only over the mask's bounding box, one at a time (memory:
    two crops, not K CT-sized volumes)."""
    m = sitk.GetArrayViewFromImage(mask) > 0
    labels = np.zeros(m.shape, np.uint8)
    if not m.any():
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(mask)
        return out
    nz = [np.nonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3)]  # z, y, x
    lo = [int(v[0]) for v in nz]
    hi = [int(v[-1]) + 1 for v in nz]
    crop_ref = sitk.RegionOfInterest(mask, [hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]], [lo[2], lo[1], lo[0]])
    best = np.full(crop_ref.GetSize()[::-1], -1.0, np.float32)
    arg = np.zeros(best.shape, np.uint8)
    for k in range(prob.shape[0]):
        p = sitk.GetArrayFromImage(sitk.Resample(model_array_to_image(prob[k], model_input.grid), crop_ref,
                                                 sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        take = p > best
        arg[take], best[take] = k + 1, p[take]
    crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    labels[crop] = np.where(m[crop], arg, 0)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(mask)
    return out


def threshold(prob: sitk.Image, level: float = 0.5) -> sitk.Image:
    mask = sitk.Cast(sitk.BinaryThreshold(prob, lowerThreshold=level, upperThreshold=1e9, insideValue=1,
                                          outsideValue=0), sitk.sitkUInt8)
    mask.CopyInformation(prob)
    return mask


def mask_to_model_grid(mask: sitk.Image, model_input: ModelInput) -> np.ndarray:
    """A mask on the CT grid -> fraction-of-voxel values (X, Y, Z) on the model grid (for training targets)."""
    m = sitk.Cast(mask > 0, sitk.sitkFloat32)
    out = sitk.Resample(m, model_input.grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)
