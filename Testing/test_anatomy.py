"""The anatomical range step (inference.anatomy) on phantoms with a planning CT's field of view: what it
removes (planted blobs in the abdomen and the neck, far strays), what it keeps (the true CTV), what it
refuses to guess (no lungs), and the shipped demo bundle contouring nothing below the lung bases."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from MMContourLib.data.phantom import TISSUE_LABELS as T
from MMContourLib.data.phantom import PhantomConfig, generate_case
from MMContourLib.inference import anatomy
from MMContourLib.inference.anatomy import anatomical_range, find_limits

PLANNING = PhantomConfig(orientation_mix={"LPS": 1.0}, planning_fov=True)
CONFIGS = {"planning": PLANNING, "oblique": PhantomConfig(orientation_mix={"oblique": 1.0}, planning_fov=True)}


@lru_cache(maxsize=None)
def case(seed: int, config: str = "planning"):
    return generate_case(seed, CONFIGS[config])


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def z_mm(image: sitk.Image) -> np.ndarray:
    """Physical LPS z of every voxel, shaped like the array."""
    return np.broadcast_to(anatomy._coordinates(image, (1, 1, 1))[1], arr(image).shape)


def voxel_cc(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def with_blob(mask: sitk.Image, centre_index, radius_vox=(2, 4, 4)) -> tuple[sitk.Image, float]:
    """``mask`` plus an ellipsoid (radii in voxels z, y, x) at ``centre_index`` (z, y, x); its cc."""
    m = arr(mask).copy()
    zz, yy, xx = np.ogrid[: m.shape[0], : m.shape[1], : m.shape[2]]
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre_index, radius_vox)) <= 1
    assert not (blob & (m > 0)).any()
    m[blob] = 1
    out = sitk.GetImageFromArray(m)
    out.CopyInformation(mask)
    return out, float(blob.sum()) * voxel_cc(mask)


def body_point(c, z_target: float, tissue: str):
    """(z, y, x) index of a voxel of ``tissue`` on the slice nearest ``z_target``."""
    z = z_mm(c.ct)[:, 0, 0]
    k = int(np.argmin(np.abs(z - z_target)))
    ys, xs = np.nonzero(arr(c.tissues)[k] == T[tissue])
    assert len(ys), (tissue, z_target)
    i = len(ys) // 2
    return k, int(ys[i]), int(xs[i])


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_planning_fov_phantom_shows_neck_to_upper_abdomen(seed):
    c = case(seed)
    ct, tissue, z = arr(c.ct).astype(float), arr(c.tissues), z_mm(c.ct)
    marks = c.info["landmarks_z_mm"]
    assert c.info["field_of_view"] == "planning"
    assert z.max() > marks["cricoid"] + 10 and z.max() - marks["sternal_notch"] >= 75  # the neck, above the cricoid
    lung = tissue == T["lung"]
    base = z[lung].min()
    assert z.min() < base - 100                                                          # the upper abdomen
    expected = {"liver": (45, 75), "kidney": (15, 45), "fluid": (-5, 30), "gas": (-1024, -900), "lung": (-920, -770)}
    for name, (lo, hi) in expected.items():
        assert (tissue == T[name]).sum() > 300, name
        assert lo <= np.median(ct[tissue == T[name]]) <= hi, (name, np.median(ct[tissue == T[name]]))
    # the lungs end at the diaphragm; the liver lies under the right dome, the stomach (gas, fluid) under the left
    liver, stomach = tissue == T["liver"], np.isin(tissue, [T["gas"], T["fluid"]])
    x = c.ct.GetOrigin()[0] + c.ct.GetSpacing()[0] * np.arange(ct.shape[2])
    assert np.median(np.broadcast_to(x, ct.shape)[liver]) < -30 < 30 < np.median(np.broadcast_to(x, ct.shape)[stomach])
    zc = z[:, :1, :1]
    liver_top = np.where(liver, zc, -np.inf).max(axis=0)
    lung_bottom = np.where(lung, zc, np.inf).min(axis=0)
    both = liver.any(axis=0) & lung.any(axis=0)
    assert both.sum() > 100 and (liver_top[both] < lung_bottom[both]).all()  # the liver only under the lung
    gas = tissue == T["gas"]
    assert z[gas].max() < base + 60 and (z[gas] < base - 50).any()                     # stomach and bowel gas
    # no target in the abdomen or the neck
    ctv = arr(c.ctv) > 0
    assert z[ctv].min() > base and z[ctv].max() < marks["cricoid"]


def test_planning_fov_is_off_by_default_and_its_extents_vary_per_case():
    assert PhantomConfig().planning_fov is False
    assert "field_of_view" not in generate_case(0, PhantomConfig(orientation_mix={"LPS": 1.0})).info
    sizes = {case(s).ct.GetSize()[2] for s in (0, 1, 2)}
    assert len(sizes) > 1
    with pytest.raises(ValueError, match="cricoid"):
        PhantomConfig(planning_fov=True, neck_mm=(20.0, 40.0))


@pytest.mark.parametrize("seed,config", [(0, "planning"), (3, "oblique")])
def test_limits_come_from_the_lungs_in_the_ct(seed, config):
    c = case(seed, config)
    limits = find_limits(c.ct)
    lung_z = z_mm(c.tissues)[arr(c.tissues) == T["lung"]]
    assert limits["lungs"] is True and limits["notes"] == []
    tolerance = 1.5 * c.ct.GetSpacing()[2]  # partial volume at the dome and apex, worse on an oblique grid
    assert abs(limits["lung_base"] - lung_z.min()) <= tolerance
    assert abs(limits["lung_apex"] - lung_z.max()) <= tolerance
    assert limits["caudal"] == pytest.approx(limits["lung_base"] - anatomy.CAUDAL_MARGIN_MM)
    assert limits["cranial"] == pytest.approx(limits["lung_apex"] + anatomy.APEX_TO_CRICOID_MM)
    assert abs(limits["cranial"] - c.info["landmarks_z_mm"]["cricoid"]) < 25
    # stomach and bowel gas are not lungs: the base is the lungs' own, above all the abdominal gas
    gas_z = z_mm(c.tissues)[arr(c.tissues) == T["gas"]]
    assert gas_z.min() < limits["caudal"]


@pytest.mark.parametrize("seed", [0, 2])
def test_planted_blobs_in_the_abdomen_and_neck_are_removed_and_reported(seed):
    c = case(seed)
    limits = find_limits(c.ct)
    planted, abdomen_cc = with_blob(c.ctv, body_point(c, limits["caudal"] - 40, "bowel"))
    planted, neck_cc = with_blob(planted, body_point(c, limits["cranial"] + 20, "muscle"))
    cleaned, report = anatomical_range(c.ct, planted)
    assert report["applied"] is True
    reasons = {r["reason"]: r["cc"] for r in report["components"]}
    assert reasons == {anatomy.CAUDAL: pytest.approx(abdomen_cc, abs=0.01),
                       anatomy.CRANIAL: pytest.approx(neck_cc, abs=0.01)}
    assert report["dropped_cc"] == pytest.approx(abdomen_cc + neck_cc, abs=0.02)
    np.testing.assert_array_equal(arr(cleaned), arr(c.ctv))          # the true CTV untouched: Dice 1.0
    assert cleaned.GetOrigin() == c.ct.GetOrigin() and cleaned.GetDirection() == c.ct.GetDirection()


def test_volume_caudal_to_the_lung_base_counts_a_planted_abdominal_blob_and_nothing_of_the_true_ctv():
    """What evaluation reports per contour (``cc_caudal_to`` the lung base): the phantom's CTV has none, a
    planted abdominal blob all of its volume, and after the range step none again."""
    from MMContourLib.inference.anatomy import cc_caudal_to

    c = case(0)
    limits = find_limits(c.ct)
    assert cc_caudal_to(c.ctv, limits["lung_base"]) == 0.0
    planted, abdomen_cc = with_blob(c.ctv, body_point(c, limits["lung_base"] - 60, "bowel"))
    assert cc_caudal_to(planted, limits["lung_base"]) == pytest.approx(abdomen_cc, abs=0.02)
    assert cc_caudal_to(anatomical_range(c.ct, planted)[0], limits["lung_base"]) == 0.0
    assert cc_caudal_to(planted, None) is None


def test_a_stray_far_from_the_target_goes_and_the_target_parts_stay():
    c = case(1)
    ctv = arr(c.ctv) > 0
    z, x = np.nonzero(ctv.any(axis=1))
    k = int(np.median(z))
    side = 1 if np.median(x) < ctv.shape[2] / 2 else -1  # the other side of the chest, inside the lung
    ys, xs = np.nonzero(arr(c.tissues)[k] == T["lung"])
    far = xs * side > np.median(xs) * side
    planted, cc = with_blob(c.ctv, (k, int(np.median(ys[far])), int(np.median(xs[far]))), (1, 2, 2))
    cleaned, report = anatomical_range(c.ct, planted)
    assert [r["reason"] for r in report["components"]] == [anatomy.FAR]
    assert report["components"][0]["cc"] == pytest.approx(cc, abs=0.01)
    np.testing.assert_array_equal(arr(cleaned), ctv.astype(np.uint8))


def test_a_component_crossing_a_limit_loses_only_the_part_beyond_it():
    c = case(0)
    limits = find_limits(c.ct)
    m = arr(c.ctv).copy()
    z = z_mm(c.ct)
    k0 = int(np.nonzero((arr(c.ctv) > 0).any(axis=(1, 2)))[0].min())
    column = (arr(c.ctv)[k0] > 0)
    m[(z[:, 0, 0] < z[k0, 0, 0]) & (z[:, 0, 0] > limits["caudal"] - 20)] |= column.astype(np.uint8)  # a downward leak
    leak = sitk.GetImageFromArray(m)
    leak.CopyInformation(c.ctv)
    cleaned, report = anatomical_range(c.ct, leak)
    out = arr(cleaned) > 0
    assert not (out & (z < limits["caudal"])).any()
    assert (out >= (arr(c.ctv) > 0)).all()
    assert [(r["reason"], r["clipped"]) for r in report["components"]] == [(anatomy.CAUDAL, True)]
    assert report["dropped_cc"] == pytest.approx(((m > 0) & (z < limits["caudal"])).sum() * voxel_cc(c.ct), abs=0.01)


def test_a_ct_without_lungs_is_left_alone_and_says_why():
    c = case(0)
    z = z_mm(c.ct)[:, 0, 0]
    limits = find_limits(c.ct)
    below = np.nonzero(z < limits["lung_base"] - 10)[0]  # an abdomen-only crop
    crop = c.ct[:, :, int(below.min()): int(below.max()) + 1]
    mask = sitk.Image(crop.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(crop)
    mask[20:40, 20:40, 2:6] = 1
    cleaned, report = anatomical_range(crop, mask)
    assert report["applied"] is False and "no lungs" in report["reason"]
    assert report["dropped_cc"] == 0 and report["components"] == []
    assert cleaned is mask


def test_lungs_cut_by_the_field_of_view_give_no_limit_on_that_side():
    c = generate_case(2, PhantomConfig(orientation_mix={"LPS": 1.0}))  # thorax only: this one's bases are cut
    limits = find_limits(c.ct)
    assert limits["caudal"] is None and limits["lung_base"] is None
    assert any("caudal edge" in n for n in limits["notes"]) and limits["cranial"] is not None
    cleaned, report = anatomical_range(c.ct, c.ctv)
    assert report["dropped_cc"] == 0
    np.testing.assert_array_equal(arr(cleaned), arr(c.ctv))


def test_mask_on_another_grid_is_refused():
    c = case(0)
    other = sitk.Image([s // 2 for s in c.ct.GetSize()], sitk.sitkUInt8)
    with pytest.raises(ValueError, match="grid"):
        anatomical_range(c.ct, other)


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_bundle_contours_nothing_caudal_to_the_lung_bases_on_a_planning_ct():
    from pathlib import Path

    from MMContourLib.inference.contourer import Contourer

    bundle = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "demo"
    contourer = Contourer.from_bundle(bundle, device="cpu")
    c = case(1)
    result = contourer.contour(c.ct, c.note)
    report = result.summary()["anatomical_range"]
    assert report["applied"] is True and report == result.anatomical_range
    z = z_mm(result.mask)
    mask = arr(result.mask) > 0
    assert mask.any()
    assert float((mask & (z < report["limits_mm"]["caudal"])).sum()) * voxel_cc(c.ct) == 0.0
    assert float((mask & (z > report["limits_mm"]["cranial"])).sum()) == 0.0


def test_the_limits_are_found_once_per_ct_not_once_per_note(tiny_bundle, monkeypatch):
    """An edited note re-contours the same CT: the landmarks come from the CT alone, so they are kept."""
    from MMContourLib.inference.contourer import Contourer

    calls = []
    real = anatomy.find_limits
    monkeypatch.setattr(anatomy, "find_limits", lambda ct: calls.append(1) or real(ct))
    ct = generate_case(1, PhantomConfig(planning_fov=True)).ct
    contourer = Contourer.from_bundle(tiny_bundle, device="cpu")
    first = contourer.contour(ct, "N1, breast conserving surgery, left side")
    second = contourer.contour(ct, "N0, breast conserving surgery, right side")
    assert len(calls) == 1 and first.anatomical_range["applied"] and second.anatomical_range["applied"]
    assert first.anatomical_range["limits_mm"] == second.anatomical_range["limits_mm"]
    contourer.contour(generate_case(2, PhantomConfig(planning_fov=True)).ct, "N1, breast conserving surgery, left side")
    assert len(calls) == 2


def test_a_piece_of_a_structure_far_from_the_rest_of_it_goes_and_neighbours_stay():
    """Per structure: a left axillary level 1 blob in the right axilla is removed and reported by name; the
    breast and the level 1 next to it stay, though each is another structure's neighbour."""
    from MMContourLib.inference.anatomy import structure_strays

    classes = ("CTVp_Breast_L", "CTVn_L1_L")
    arr = np.zeros((30, 40, 60), np.uint8)
    arr[5:25, 10:30, 35:50] = 1        # breast
    arr[5:25, 10:30, 50:56] = 2        # level 1, touching it
    arr[10:14, 15:19, 2:6] = 2         # a level 1 piece > 40 mm away (2 mm voxels: 88 mm)
    labels = sitk.GetImageFromArray(arr)
    labels.SetSpacing((2.0, 2.0, 2.0))
    cleaned, removed = structure_strays(labels, classes)
    out = sitk.GetArrayFromImage(cleaned)
    assert len(removed) == 1 and removed[0]["structure"] == "CTVn_L1_L" and "CTVn_L1_L" in removed[0]["reason"]
    assert removed[0]["cc"] == pytest.approx(4 * 4 * 4 * 8 / 1000, abs=0.01)  # reported to 0.01 cc
    assert not out[10:14, 15:19, 2:6].any()
    assert (out[5:25, 10:30, 35:50] == 1).all() and (out[5:25, 10:30, 50:56] == 2).all()
    assert structure_strays(cleaned, classes)[1] == []


@pytest.mark.parametrize("config", ["planning", "oblique"])
def test_the_ct_shows_which_side_lost_its_breast_and_a_note_naming_the_other_is_flagged(config):
    """The breast mound per side (body in front of the skin over the sternum): a mastectomy side has a small
    fraction of the intact side's. A note calling the intact side the mastectomy (the contradiction v13 met
    in its side flips) is flagged in one line naming both volumes; the true note is not, and neither is a
    conserved breast, which the CT cannot tell from an intact one."""
    from MMContourLib.inference.review import mound_reasons, review_contour
    from MMContourLib.note.clinical import ClinicalNote

    cfg = CONFIGS[config]
    operated = generate_case(4, cfg, note=ClinicalNote.parse("N0, total mastectomy surgery, right side"))
    mounds = find_limits(operated.ct)["breast_mound_cc"]
    assert mounds["right"] < 0.3 * mounds["left"] and mounds["left"] > 80, mounds
    true_note, flipped = operated.note, operated.note.replace(side="left")
    assert mound_reasons(mounds, true_note) == []
    [reason] = mound_reasons(mounds, flipped)
    assert reason.kind == "note" and "total mastectomy surgery on the left side" in reason.text
    assert f"{mounds['left']:.0f} cc in front of the chest, {mounds['right']:.0f} cc on the right side" in reason.text
    both = ClinicalNote.parse("N0, total mastectomy surgery, left side; N0, total mastectomy surgery, right side")
    [left] = mound_reasons(mounds, both)  # each side on its own: the operated right one is not flagged
    assert "on the left side" in left.text
    conserved = generate_case(4, cfg, note=ClinicalNote.parse("N0, breast conserving surgery, left side"))
    both_sides = find_limits(conserved.ct)["breast_mound_cc"]
    assert 0.7 < both_sides["left"] / both_sides["right"] < 1.4, both_sides
    assert mound_reasons(both_sides, conserved.note.replace(side="right")) == []
    # the range step's report carries the mounds, and the review of a contour reads them from it
    _cleaned, report = anatomical_range(operated.ct, operated.ctv)
    assert report["breast_mound_cc"] == mounds and "breast_mound_cc" not in report["limits_mm"]
    review = review_contour(operated.ct, sitk.Cast(operated.ctv, sitk.sitkFloat32), operated.ctv, flipped, None,
                            anatomical_range=report)
    assert reason.line() in [r.line() for r in review.reasons] and review.measures["breast_mound_cc"] == mounds
    assert not any("breast mound" in r.text for r in review_contour(
        operated.ct, sitk.Cast(operated.ctv, sitk.sitkFloat32), operated.ctv, true_note, None,
        anatomical_range=report).reasons)
