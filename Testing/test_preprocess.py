"""Geometry: any orientation in, the CT's exact grid out; resampling there and back moves < 1 voxel."""
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib.image.preprocess import (InputImageError, PreprocessConfig, RAS_DIRECTION, mask_to_model_grid,
                                     probabilities_to_ct_grid, threshold, to_model_grid)

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)
LAS = (-1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS = RAS_DIRECTION


def oblique(angle_deg=17.0, tilt_deg=8.0):
    a, t = np.radians(angle_deg), np.radians(tilt_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return tuple((rz @ rx).ravel())


def sphere_mask(image, center_mm, radius_mm):
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    d = np.array(image.GetDirection()).reshape(3, 3)
    pts = np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ d.T
    inside = np.linalg.norm(pts - np.array(center_mm), axis=1) <= radius_mm
    arr = inside.reshape(size).transpose(2, 1, 0).astype(np.uint8)
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(image)
    return m


def centroid_mm(mask):
    arr = sitk.GetArrayFromImage(mask).transpose(2, 1, 0)
    idx = np.argwhere(arr > 0).mean(0)
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


@pytest.mark.parametrize("direction", [LPS, LAS, RAS, oblique()], ids=["LPS", "LAS", "RAS", "oblique"])
def test_round_trip_lands_on_input_grid_and_moves_less_than_a_voxel(direction):
    ct = make_ct(size=(60, 50, 30), spacing=(1.5, 1.5, 4.0), direction=direction, origin=(10.0, -20.0, 30.0))
    config = PreprocessConfig(spacing=(2.0, 2.0, 3.0))
    model_input = to_model_grid(ct, config)
    assert model_input.grid.GetDirection() == RAS_DIRECTION
    assert 0.0 <= model_input.array.min() and model_input.array.max() <= 1.0
    center = ct.TransformContinuousIndexToPhysicalPoint([29.5, 24.5, 14.5])
    truth = sphere_mask(ct, center, 22.0)
    prob = mask_to_model_grid(truth, model_input)
    back = threshold(probabilities_to_ct_grid(prob, model_input))
    assert back.GetSize() == ct.GetSize() and back.GetSpacing() == ct.GetSpacing()
    assert back.GetOrigin() == ct.GetOrigin() and back.GetDirection() == ct.GetDirection()
    shift = np.linalg.norm(centroid_mm(back) - centroid_mm(truth))
    assert shift < min(ct.GetSpacing()), f"moved {shift:.2f} mm"
    a, b = sitk.GetArrayFromImage(truth) > 0, sitk.GetArrayFromImage(back) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95


def test_orientations_see_the_same_anatomy():
    """The same physical volume stored LPS or flipped gives the same model-grid array."""
    ct = make_ct(size=(40, 36, 20), spacing=(2.0, 2.0, 3.0))
    flipped = sitk.Flip(ct, [True, False, True])  # same physical content, other storage order
    config = PreprocessConfig(spacing=(2.0, 2.0, 3.0))
    a, b = to_model_grid(ct, config).array, to_model_grid(flipped, config).array
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("pixel", [sitk.sitkInt16, sitk.sitkFloat32])
def test_pixel_types_and_padding_values(pixel):
    ct = make_ct(dtype=pixel)
    arr = sitk.GetArrayFromImage(ct)
    arr[:, :3, :] = -3024  # outside the reconstruction circle
    arr[:, -3:, :] = -2048
    padded = sitk.GetImageFromArray(arr)
    padded.CopyInformation(ct)
    x = to_model_grid(padded, PreprocessConfig(spacing=(4.0, 4.0, 6.0))).array
    assert x.min() == 0.0 and x.max() <= 1.0


def test_unsigned_ct_is_shifted_to_hu():
    ct = sitk.Clamp(make_ct(), lowerBound=-1024)  # a stored value cannot go below 0
    raw = sitk.Cast(sitk.Cast(ct, sitk.sitkFloat32) + 1024, sitk.sitkUInt16)
    a = to_model_grid(ct, PreprocessConfig(spacing=(4.0, 4.0, 6.0)))
    b = to_model_grid(raw, PreprocessConfig(spacing=(4.0, 4.0, 6.0)))
    assert np.abs(a.array - b.array).max() < 1e-3 and b.notes


def test_bad_images_are_refused_clearly():
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 6.0))
    with pytest.raises(InputImageError, match="3D"):
        to_model_grid(sitk.Image([20, 20], sitk.sitkInt16), cfg)
    with pytest.raises(InputImageError, match="3D"):
        to_model_grid(sitk.Image([8, 8, 8, 2], sitk.sitkInt16), cfg)
    with pytest.raises(InputImageError, match="empty or flat"):
        to_model_grid(sitk.Image([20, 20, 1], sitk.sitkInt16), cfg)
    mr = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1, (20, 30, 30)).astype(np.float32))
    with pytest.raises(InputImageError, match="Hounsfield"):
        to_model_grid(mr, cfg)
    nan = sitk.GetArrayFromImage(sitk.Cast(make_ct(), sitk.sitkFloat32))
    nan[3, 4, 5] = np.nan
    with pytest.raises(InputImageError, match="NaN"):
        to_model_grid(sitk.GetImageFromArray(nan), cfg)
    with pytest.raises(InputImageError, match="covers only"):
        to_model_grid(make_ct(size=(10, 10, 4)), cfg, min_size=(32, 32, 16))
