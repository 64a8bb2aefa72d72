"""Synthetic breast CT phantoms: determinism, HU, the guideline target rules (docs/method.md), what the CT shows and
does not show, counterfactual notes, manifests on disk and storage orientations."""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MMContourLib.cli import phantom as phantom_cli
from MMContourLib.data import phantom as ph
from MMContourLib.data import phantom_dataset as dataset
from MMContourLib.note.clinical import ClinicalNote
from MMContourLib.note.targets import REGION_LABELS as L
from MMContourLib.data.phantom import TISSUE_LABELS as T
from MMContourLib.data.phantom import PhantomConfig, generate_case
from MMContourLib.note.targets import ctv_for_note, labels_of

CONFIGS = {
    "lps": PhantomConfig(orientation_mix={"LPS": 1.0}),
    "ras": PhantomConfig(orientation_mix={"RAS": 1.0}),
    "oblique": PhantomConfig(orientation_mix={"oblique": 1.0}),
    # coarse grid for tests that need many cases
    "coarse": PhantomConfig(orientation_mix={"LPS": 1.0}, in_plane_spacing=3.0, slice_thickness=6.0),
}
NODAL = ("axilla", "supraclavicular", "internal_mammary")
LEVELS = ("axilla_l1", "axilla_l2", "axilla_l3")                  # ESTRO 2015 axillary levels I-III
UNSPLIT = {"axilla_left", "axilla_right"}                         # the axilla as one label: older maps only


@lru_cache(maxsize=None)
def case(seed: int, note: str | None = None, config: str = "lps") -> ph.PhantomCase:
    return generate_case(seed, CONFIGS[config], note=None if note is None else ClinicalNote.parse(note))


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def x_mm(image: sitk.Image) -> np.ndarray:
    """Physical LPS x (+ = patient left) of each column of an axis-aligned LPS image."""
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return image.GetOrigin()[0] + image.GetSpacing()[0] * np.arange(image.GetSize()[0])


def labels(*names: str) -> list[int]:
    """Label values of regions and their parts ("axilla_left" -> the unsplit label and levels I-III)."""
    return [v for n in names for v in labels_of(n)]


def chest_thickness(c: ph.PhantomCase, side: str) -> float:
    """Median, over the (slice, column)s of the side's chest-wall region, of the CT distance
    from the skin to the lung in mm (breast mound + chest wall; read from HU only)."""
    ct = arr(c.ct)
    z, x = np.nonzero((arr(c.regions) == L[f"chestwall_{side}"]).any(axis=1))
    profiles = ct[z, :, x]                                   # (columns, rows from anterior to posterior)
    skin = (profiles > -400).argmax(axis=1)
    rows = np.arange(ct.shape[1])[None, :]
    lung = ((profiles < -600) & (rows > skin[:, None])).argmax(axis=1)
    ok = lung > skin
    return float(np.median(lung[ok] - skin[ok]) * c.ct.GetSpacing()[1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


# ------------------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_case_and_another_seed_another():
    a, b = generate_case(11), generate_case(11)  # default config: orientation is drawn too
    assert a.note == b.note == ph.sample_note(11)
    assert a.info == {**b.info, "generation_s": a.info["generation_s"]}
    for key in ("ct", "ctv", "regions", "tissues"):
        np.testing.assert_array_equal(arr(getattr(a, key)), arr(getattr(b, key)))
        assert getattr(a, key).GetDirection() == getattr(b, key).GetDirection()
    c = generate_case(12)
    assert c.note != a.note or not np.array_equal(arr(c.ct), arr(a.ct))
    assert c.case_id != a.case_id


def test_default_case_has_the_documented_types_grid_and_speed():
    generate_case(1, CONFIGS["lps"])  # warm caches
    start = time.perf_counter()
    c = generate_case(2, CONFIGS["lps"])
    seconds = time.perf_counter() - start
    assert c.ct.GetPixelID() == sitk.sitkInt16
    assert c.ctv.GetPixelID() == sitk.sitkUInt8 and c.regions.GetPixelID() == sitk.sitkUInt8
    assert c.ct.GetSize() == (182, 155, 60) and c.ct.GetSpacing() == pytest.approx((2.2, 2.2, 5.0))
    for other in (c.ctv, c.regions, c.tissues):
        assert other.GetSize() == c.ct.GetSize() and other.GetOrigin() == c.ct.GetOrigin()
        assert other.GetSpacing() == c.ct.GetSpacing() and other.GetDirection() == c.ct.GetDirection()
    assert set(np.unique(arr(c.ctv))) == {0, 1}
    assert set(np.unique(arr(c.regions))) <= {0, *L.values()}
    assert seconds < 3.0, f"one default case took {seconds:.2f} s (budget: about 1 s on a free core)"


def test_hu_of_each_tissue_is_plausible():
    c = case(3)
    ct, tissue = arr(c.ct).astype(float), arr(c.tissues)
    in_plane = np.zeros((1, 3, 3), bool)
    in_plane[0] = True

    def median(*names):
        mask = np.isin(tissue, [T[n] for n in names])
        core = ndimage.binary_erosion(mask, structure=in_plane)
        assert core.sum() > 200, names
        return float(np.median(ct[core]))

    expected = {("fat",): (-125, -75), ("muscle",): (30, 70), ("lung",): (-920, -770), ("blood",): (20, 65),
                ("organ",): (35, 80), ("cartilage",): (70, 200), ("cancellous_bone", "cortical_bone"): (300, 1100),
                ("air",): (-1024, -980)}
    for names, (lo, hi) in expected.items():
        assert lo <= median(*names) <= hi, (names, median(*names))
    dense = case(5)  # a breast with more fibroglandular tissue: gland is soft tissue inside fat
    g = np.isin(arr(dense.tissues), [T["gland"]])
    assert 5 <= np.median(arr(dense.ct)[ndimage.binary_erosion(g, structure=in_plane)]) <= 70
    outside_circle = generate_case(3, replace(CONFIGS["lps"], outside_fov_value=-3024))
    assert arr(outside_circle.ct)[:, 0, 0].tolist() == [-3024] * 60  # corner outside the reconstruction circle
    assert arr(c.ct).min() >= -1024


def test_left_bcs_n0_ctv_is_the_left_breast_only():
    c = case(5, "N0, breast conserving surgery, left side")
    ctv, reg = arr(c.ctv), arr(c.regions)
    np.testing.assert_array_equal(ctv, (reg == L["breast_left"]).astype(np.uint8))
    cc = ctv.sum() * np.prod(c.ct.GetSpacing()) / 1000
    assert 150 < cc < 2500, cc
    assert (x_mm(c.ct)[ctv.any(axis=(0, 1))] > 0).all(), "the CTV must lie on the patient's left (LPS +x)"
    assert c.info["sides"]["left"]["breast"] == "conserved" and c.info["sides"]["right"]["breast"] == "intact"


def test_right_mastectomy_n2_ctv_is_right_chest_wall_and_nodes_and_no_mound():
    c = case(6, "N2, total mastectomy surgery, right side")
    ctv, reg = arr(c.ctv), arr(c.regions)
    want = labels("chestwall_right", "axilla_right", "supraclavicular_right", "internal_mammary_right")
    np.testing.assert_array_equal(ctv, np.isin(reg, want).astype(np.uint8))
    present = set(np.unique(reg))
    assert L["breast_right"] not in present and L["breast_left"] in present
    assert (x_mm(c.ct)[ctv.any(axis=(0, 1))] < 0).all()
    # the CT itself shows the mastectomy: skin directly over the chest wall on the right, a breast on the left
    right, left = chest_thickness(c, "right"), chest_thickness(c, "left")
    assert right < 55 and left > right + 20, (right, left)


def test_bilateral_note_gets_each_side_by_its_own_row_of_the_table():
    note = "N0, breast conserving surgery, left side; N1, total mastectomy surgery, right side"
    c = case(8, note)
    want = labels("breast_left", "chestwall_right", "axilla_right", "supraclavicular_right", "internal_mammary_right")
    np.testing.assert_array_equal(arr(c.ctv), np.isin(arr(c.regions), want).astype(np.uint8))
    assert c.info["sides"]["left"]["breast"] == "conserved" and c.info["sides"]["right"]["breast"] == "removed"
    assert chest_thickness(c, "left") > chest_thickness(c, "right") + 20
    both_bcs = case(8, "N2, breast conserving surgery, left side; N0, breast conserving surgery, right side")
    want = labels("breast_left", "breast_right", "axilla_left", "supraclavicular_left", "internal_mammary_left")
    np.testing.assert_array_equal(arr(both_bcs.ctv), np.isin(arr(both_bcs.regions), want).astype(np.uint8))


def test_regions_describe_both_sides_whatever_the_note_says():
    c = case(5, "N0, breast conserving surgery, left side")
    reg, tissue = arr(c.regions), arr(c.tissues)
    x = x_mm(c.ct)
    volumes = {name: int((reg == label).sum()) for name, label in L.items()}
    assert all(v > 50 for n, v in volumes.items() if n not in UNSPLIT), volumes
    assert all(volumes[n] == 0 for n in UNSPLIT), "new phantoms write the axilla as levels I-III only"
    for name, label in L.items():
        columns = x[(reg == label).any(axis=(0, 1))]
        assert (columns > 0).all() if name.endswith("_left") else (columns < 0).all(), name
    nodal = np.isin(reg, labels(*(f"{r}_{s}" for r in NODAL for s in ("left", "right"))))
    bony_or_lung = np.isin(tissue, [T["lung"], T["cortical_bone"], T["cancellous_bone"], T["airway"]])
    assert not (nodal & bony_or_lung).any(), "nodal CTVs exclude lung, bone and airway"
    # the nodal CTV hugs the veins: ESTRO's ~5 mm margin, so it holds vessels and little else of the vein-free body
    assert (tissue[nodal] == T["blood"]).mean() > 0.1
    m = case(6, "N2, total mastectomy surgery, right side")
    assert {k for k, v in L.items() if (arr(m.regions) == v).sum() > 50} == set(L) - {"breast_right"} - UNSPLIT


def test_ctv_for_note_gives_the_truth_for_counterfactual_notes():
    c = case(5, "N0, breast conserving surgery, left side")
    reg = arr(c.regions)
    base = ctv_for_note(reg, c.note)
    assert isinstance(base, np.ndarray) and base.dtype == np.uint8
    np.testing.assert_array_equal(base, arr(c.ctv))

    n2 = ctv_for_note(c.regions, c.note.replace(n_stage="N2"))  # image in, image out on the same grid
    assert isinstance(n2, sitk.Image) and n2.GetPixelID() == sitk.sitkUInt8
    assert n2.GetOrigin() == c.regions.GetOrigin() and n2.GetDirection() == c.regions.GetDirection()
    added = arr(n2).astype(bool) & ~base.astype(bool)
    assert (arr(n2) >= base).all() and set(np.unique(reg[added])) == set(labels(*(f"{r}_left" for r in NODAL))) - {
        L["axilla_left"]}
    assert np.array_equal(ctv_for_note(reg, c.note.replace(n_stage="N1mi")), base), "N1mi is treated as N0"

    right = ctv_for_note(reg, c.note.replace(side="right"))
    np.testing.assert_array_equal(right, (reg == L["breast_right"]).astype(np.uint8))
    assert not (right & base).any()
    chest_wall = ctv_for_note(reg, c.note.replace(surgery="mastectomy"))
    np.testing.assert_array_equal(chest_wall, (reg == L["chestwall_left"]).astype(np.uint8))
    assert chest_wall.sum() > 0 and not (chest_wall & base).any()

    m = case(6, "N2, total mastectomy surgery, right side")
    asked_breast = ctv_for_note(arr(m.regions), ClinicalNote.parse("N0, breast conserving surgery, right side"))
    np.testing.assert_array_equal(asked_breast, (arr(m.regions) == L["chestwall_right"]).astype(np.uint8))


def test_axillary_level_borders_are_the_pectoralis_minor_edges_seen_from_the_front():
    from MMContourLib.data.phantom_anatomy import PEC_MINOR_MM, _axillary_levels

    # a muscle running cranio-caudally at |x| = 100 mm over a vein running medial -> lateral at z = 0
    for sign in (1, -1):
        muscle = np.array([(sign * 100.0, -40.0, -60.0), (sign * 100.0, -45.0, 20.0)])
        vein = np.array([(sign * 30.0, -20.0, 0.0), (sign * 160.0, -10.0, 0.0)])
        w = _axillary_levels(muscle, vein, sign)
        x = sign * np.array([80.0, 100.0 - PEC_MINOR_MM + 1, 100.0, 100.0 + PEC_MINOR_MM - 1, 120.0])
        np.testing.assert_allclose(w(x, np.zeros(5)), [-20, -PEC_MINOR_MM + 1, 0, PEC_MINOR_MM - 1, 20], atol=1e-3)
        np.testing.assert_allclose(w(x, np.full(5, 50.0)), w(x, np.zeros(5)), atol=1e-3)  # z along the muscle


@pytest.mark.parametrize("seed,config", [(5, "lps"), (6, "lps"), (8, "coarse"), (9, "arms_down"), (4, "external")])
def test_axilla_is_split_into_levels_one_two_three_from_lateral_to_medial(seed, config):
    cfg = {"arms_down": replace(CONFIGS["lps"], arms_up_fraction=0.0),
           "external": replace(PhantomConfig.external_site(), orientation_mix={"LPS": 1.0})}.get(config)
    c = case(seed, config=config) if cfg is None else generate_case(seed, cfg)
    reg = arr(c.regions)
    x = np.abs(x_mm(c.ct))
    z = c.ct.GetOrigin()[2] + c.ct.GetSpacing()[2] * np.arange(reg.shape[0])
    for side in ("left", "right"):
        masks = [reg == L[f"{level}_{side}"] for level in LEVELS]
        lateral, cranial = [], []
        for level, m in zip(LEVELS, masks):
            assert m.sum() > 50, (side, level, int(m.sum()))
            components, n = ndimage.label(m, np.ones((3, 3, 3)))
            assert np.bincount(components.ravel())[1:].max() > 0.9 * m.sum(), (side, level, n)  # one piece
            kk, _, ii = np.nonzero(m)
            lateral.append(x[ii].mean())
            cranial.append(z[kk].mean())
        # level I lateral of level II lateral of level III (along the axillary vein towards the venous angle),
        # and level III highest, under the clavicle
        assert lateral[0] > lateral[1] + 5 > lateral[2] + 10, (side, lateral)
        assert cranial[2] >= cranial[1] >= cranial[0], (side, cranial)
        # the three levels are exactly the axilla the note's nodal CTV holds besides level IV and the IMN
        n0 = ClinicalNote.parse(f"N0, breast conserving surgery, {side} side")
        added = ctv_for_note(reg, n0.replace(n_stage="N2")).astype(bool) & ~ctv_for_note(reg, n0).astype(bool)
        axilla = added & ~np.isin(reg, labels(f"supraclavicular_{side}", f"internal_mammary_{side}"))
        np.testing.assert_array_equal(axilla, masks[0] | masks[1] | masks[2])
    assert not np.isin(reg, [L[n] for n in UNSPLIT]).any()


def test_nodal_status_is_invisible_on_ct():
    n0 = case(5, "N0, breast conserving surgery, left side")
    n2 = case(5, "N2, breast conserving surgery, left side")
    np.testing.assert_array_equal(arr(n0.ct), arr(n2.ct))
    np.testing.assert_array_equal(arr(n0.regions), arr(n2.regions))
    assert arr(n2.ctv).sum() > arr(n0.ctv).sum()


SIGNS = {"seroma": "p_seroma", "clips": "p_clips", "skin_thickening": "p_skin_thickening", "distortion": "p_distortion"}
NO_SIGNS = replace(CONFIGS["lps"], **{knob: 0.0 for knob in SIGNS.values()})
LEFT_BCS = "N1, breast conserving surgery, left side"


def test_conserved_breast_shows_the_surgery_in_most_cases_and_only_on_the_treated_side():
    shown = []
    for seed in range(16):
        c = case(seed, LEFT_BCS, "coarse")
        tissue, reg, ct = arr(c.tissues), arr(c.regions), arr(c.ct)
        right = x_mm(c.ct) < 0
        marks = np.isin(tissue, [T["seroma"], T["clip"], T["scar"]])
        assert not marks[..., right].any(), f"seed {seed}: surgical trace on the untreated side"
        assert not (ct[..., right] > 1500).any()
        left = c.info["sides"]["left"]
        assert marks.any() == (left["seroma"] or left["clips"] or left["distortion"])
        finding = any(left[k] for k in SIGNS)
        assert finding == c.info["treatment_visible"]["left"]
        assert c.info["treatment_visible_5mm"]["left"] == (finding and any(left[k] for k in SIGNS if k != "clips"))
        if marks.any():
            assert (reg[marks] == L["breast_left"]).mean() > 0.7
            if left["clips"]:
                assert (ct[..., ~right] > 1000).any(), "clips are metal-bright"
        assert c.info["sides"]["right"] == {**c.info["sides"]["right"], "breast": "intact",
                                            **{k: False for k in SIGNS}}
        shown.append(finding)
    assert 0.6 <= np.mean(shown) < 1.0, shown
    # nothing shows the treated side: the left- and the right-sided note give the same CT
    quiet = replace(CONFIGS["coarse"], **{knob: 0.0 for knob in SIGNS.values()})
    left_note = generate_case(3, quiet, note=ClinicalNote.parse(LEFT_BCS))
    right_note = generate_case(3, quiet, note=ClinicalNote.parse(LEFT_BCS.replace("left", "right")))
    assert not left_note.info["treatment_visible"]["left"] and not right_note.info["treatment_visible"]["right"]
    np.testing.assert_array_equal(arr(left_note.ct), arr(right_note.ct))


def test_each_surgical_sign_shows_only_on_the_treated_breast_and_a_5mm_grid_keeps_it():
    from MMContourLib.image.preprocess import PreprocessConfig, to_model_grid

    note, grid5 = ClinicalNote.parse(LEFT_BCS), PreprocessConfig(spacing=(5.0, 5.0, 5.0))
    quiet = generate_case(3, NO_SIGNS, note=note)
    assert not any(quiet.info["sides"]["left"][k] for k in SIGNS)
    x = x_mm(quiet.ct)
    coarse_quiet = to_model_grid(quiet.ct, grid5)
    coarse_x = np.array([coarse_quiet.grid.TransformIndexToPhysicalPoint((i, 0, 0))[0]
                         for i in range(coarse_quiet.array.shape[0])])
    for sign, knob in SIGNS.items():
        c = generate_case(3, replace(NO_SIGNS, **{knob: 1.0}), note=note)
        assert {k for k in SIGNS if c.info["sides"]["left"][k]} == {sign}
        assert not any(c.info["sides"]["right"][k] for k in SIGNS)
        assert c.info["treatment_visible"] == {"left": True, "right": False}
        assert c.info["treatment_visible_5mm"] == {"left": sign != "clips", "right": False}
        diff = arr(c.ct).astype(float) - arr(quiet.ct)
        assert not diff[..., x < -20].any(), f"{sign} changed the untreated (right) side"
        assert (np.abs(diff[..., x > 0]) > 30).sum() >= 3, sign
        coarse = (to_model_grid(c.ct, grid5).array - coarse_quiet.array) * 2000.0  # HU on the 5 mm grid
        assert not (np.abs(coarse[coarse_x < -20]) > 30).any(), sign
        if sign != "clips":  # a 1-2 mm clip is mostly lost on a 5 mm grid; the other signs are not
            assert (np.abs(coarse[coarse_x > 0]) > 30).sum() >= 15, (sign, int((np.abs(coarse) > 30).sum()))
    # a mastectomy side never has a sign of breast-conserving surgery, whatever the knobs
    m = generate_case(3, replace(NO_SIGNS, **{knob: 1.0 for knob in SIGNS.values()}),
                      note=ClinicalNote.parse("N0, total mastectomy surgery, left side"))
    assert not any(m.info["sides"][s][k] for s in ("left", "right") for k in SIGNS)
    assert m.info["treatment_visible"] == m.info["treatment_visible_5mm"] == {"left": True, "right": False}


def test_skin_thickening_thickens_the_skin_and_densifies_the_fat_beneath_on_the_ct():
    cfg = replace(NO_SIGNS, in_plane_spacing=1.2, breast_density=0.05, noise_hu=10.0)
    note = ClinicalNote.parse(LEFT_BCS)
    quiet, thick = generate_case(7, cfg, note=note), generate_case(7, replace(cfg, p_skin_thickening=1.0), note=note)
    extra, oedema = thick.info["sides"]["left"]["skin_extra_mm"], thick.info["sides"]["left"]["oedema_hu"]
    assert 2.0 <= extra <= 4.0 and 10.0 <= oedema <= 30.0
    dy = thick.ct.GetSpacing()[1]

    def profile(c, side):
        """Median over the breast's columns (anterior -> posterior, HU only) of the skin's thickness
        (mm above -35 HU in the first 12 mm from the body surface) and of the fat 3-15 mm beneath it (HU)."""
        ct = arr(c.ct).astype(float)
        z, xi = np.nonzero((arr(quiet.regions) == L[f"breast_{side}"]).any(axis=1))
        rows = ct[z, :, xi]
        surface = (rows > -400).argmax(axis=1)
        depth = np.arange(rows.shape[1])[None, :] - surface[:, None]
        skin = ((rows > -35) & (depth >= 0) & (depth < int(12 / dy))).sum(axis=1)
        fat = [np.median(r[s + k + int(3 / dy): s + k + int(15 / dy)]) for r, s, k in zip(rows, surface, skin)]
        return float(np.median(skin) * dy), float(np.median(fat))

    (skin_q, fat_q), (skin_t, fat_t), (skin_r, fat_r) = profile(quiet, "left"), profile(thick, "left"), profile(thick, "right")
    assert skin_t - skin_q >= 0.75 * extra and skin_t - skin_r >= 0.75 * extra, (skin_q, skin_t, skin_r, extra)
    assert skin_t - skin_q <= 2.5 * extra + dy
    assert fat_t - fat_q >= 0.4 * oedema and fat_t - fat_r >= 0.4 * oedema, (fat_q, fat_t, fat_r, oedema)
    assert abs(skin_q - skin_r) < 1.5 and abs(fat_q - fat_r) < 10  # without it both breasts look alike


@pytest.mark.parametrize("external", [False, True])
def test_share_of_conserved_breasts_showing_the_surgery_is_as_configured(external):
    from MMContourLib.data.phantom_anatomy import _draw_patient

    cfg = PhantomConfig.external_site() if external else PhantomConfig()
    expected = cfg.visibility()
    assert 0.85 <= expected["any_sign"] <= (0.95 if external else 0.90)  # the calibration: P(no sign) 0.05-0.15
    assert 0.80 <= expected["at_5mm"] <= 0.95  # what a vision-only model on a 5 mm grid can find
    shown, coarse = [], []
    for seed in range(400):  # the patient only (no rendering): what generate_case(seed) draws
        p = _draw_patient(np.random.default_rng([seed, 1]), ph.sample_note(seed, cfg), cfg, 300.0)
        for side in p.sides.values():
            signs = {"seroma": side.seroma, "clips": side.clips, "skin": side.skin, "distortion": side.distortion}
            if side.state != "conserved":
                assert not any(signs.values()), side.state
                continue
            shown.append(any(signs.values()))
            coarse.append(side.seroma or side.skin or side.distortion)
    assert len(shown) > 200
    assert abs(np.mean(shown) - expected["any_sign"]) < 0.05, (np.mean(shown), expected)
    assert abs(np.mean(coarse) - expected["at_5mm"]) < 0.06, (np.mean(coarse), expected)


def test_case_mix_follows_the_paper_defaults_and_the_external_site_differs():
    notes = [ph.sample_note(s) for s in range(400)]
    sides = [s for n in notes for s in n.sides]
    n0 = np.mean([all(s.n_stage == "N0" for s in n.sides) for n in notes])
    mastectomy = np.mean([s.surgery == "mastectomy" for s in sides])
    bilateral = np.mean([n.side == "both" for n in notes])
    left = np.mean([n.side == "left" for n in notes])
    assert 0.40 <= n0 <= 0.62 and 0.25 <= mastectomy <= 0.42 and 0.005 <= bilateral <= 0.08, (n0, mastectomy, bilateral)
    assert 0.38 <= left <= 0.62
    assert {s.n_stage for s in sides} == {"N0", "N1mi", "N1", "N2", "N3"}
    for n in notes:
        assert ClinicalNote.from_fields(**n.to_fields()) == n
        if any(s.t_stage == "Tis" for s in n.sides):
            assert n.pathology == "DCIS" and all(s.n_stage == "N0" for s in n.sides)
    # surgery (visible) is drawn independently of nodes (invisible)
    pos = [s.node_positive for s in sides]
    mast = [s.surgery == "mastectomy" for s in sides]
    assert abs(np.mean([p for p, m in zip(pos, mast) if m]) - np.mean([p for p, m in zip(pos, mast) if not m])) < 0.15

    external = [ph.sample_note(s, PhantomConfig.external_site()) for s in range(400)]
    ext_sides = [s for n in external for s in n.sides]
    assert np.mean([s.node_positive for s in ext_sides]) > np.mean(pos) + 0.08
    assert np.mean([s.surgery == "mastectomy" for s in ext_sides]) > mastectomy + 0.05


def test_external_site_config_shifts_the_scanner():
    base, ext = PhantomConfig(), PhantomConfig.external_site()
    assert ext.in_plane_spacing != base.in_plane_spacing and ext.slice_thickness != base.slice_thickness
    assert ext.outside_fov_value == -3024 and ext.orientation_mix != base.orientation_mix
    c = generate_case(4, replace(ext, orientation_mix={"LPS": 1.0}))
    ct, tissue = arr(c.ct).astype(float), arr(c.tissues)
    assert c.ct.GetSpacing() == pytest.approx((ext.in_plane_spacing,) * 2 + (ext.slice_thickness,))
    assert ct[:, 0, 0].max() == -3024
    fat = np.median(ct[ndimage.binary_erosion(tissue == T["fat"], iterations=1)])
    expected = -100 * c.info["hu_scale"] + c.info["hu_offset"]
    assert abs(fat - expected) < 25 and c.info["hu_offset"] >= 12
    clinical = PhantomConfig.clinical()
    assert round(clinical.fov_mm[0] / clinical.in_plane_spacing) == 512 and clinical.slice_thickness == 2.5


def test_orientations_store_the_same_anatomy():
    lps, ras, obl = case(21), case(21, config="ras"), case(21, config="oblique")
    assert lps.note == ras.note == obl.note
    assert ras.ct.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    direction = np.array(obl.ct.GetDirection()).reshape(3, 3)
    assert np.abs(direction - np.eye(3)).max() > 0.03 and np.allclose(direction @ direction.T, np.eye(3))
    for key in ("ct", "regions", "ctv"):
        back = sitk.Resample(getattr(ras, key), getattr(lps, key), sitk.Transform(), sitk.sitkNearestNeighbor)
        np.testing.assert_array_equal(arr(back), arr(getattr(lps, key)))
    regions = arr(sitk.Resample(obl.regions, lps.regions, sitk.Transform(), sitk.sitkNearestNeighbor))
    ref = arr(lps.regions)
    assert dice(regions > 0, ref > 0) > 0.95
    for name, label in L.items():
        assert dice(regions == label, ref == label) > 0.85, name
    ct = arr(sitk.Resample(obl.ct, lps.ct, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
    body = ndimage.binary_erosion(arr(lps.tissues) > 0, iterations=2) & (ct > -1024)
    diff = ct[body] - arr(lps.ct)[body]
    assert abs(np.median(diff)) < 10 and np.mean(np.abs(diff)) < 50


def test_write_dataset_writes_manifest_images_and_notes(tmp_path):
    out = tmp_path / "phantoms"
    manifest = dataset.write_dataset(6, out, seed=2, config=replace(CONFIGS["coarse"], p_bilateral=0.5), progress=False)
    assert manifest == out / "manifest.csv"
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["case_id", "ct", "ctv", "split", "age", "side", "t_stage", "n_stage", "m_stage",
                                 "surgery", "chemotherapy", "pathology", "regions"]
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert len({r["case_id"] for r in rows}) == 6
    bilateral = [r for r in rows if r["side"] == "both"]
    assert bilateral and any(";" in r["n_stage"] + r["surgery"] for r in bilateral)
    for row in rows:
        note = ClinicalNote.from_row(row)
        if ";" in row["n_stage"]:
            assert row["n_stage"].startswith("left:") and ";right:" in row["n_stage"]
        paths = {k: manifest.parent / row[k] for k in ("ct", "ctv", "regions")}
        assert all(not row[k].startswith("/") and p.is_file() for k, p in paths.items())
        ct, ctv, reg = (sitk.ReadImage(str(paths[k])) for k in ("ct", "ctv", "regions"))
        assert ct.GetPixelID() == sitk.sitkInt16 and ct.GetSize() == ctv.GetSize() == reg.GetSize()
        np.testing.assert_array_equal(arr(ctv), ctv_for_note(arr(reg), note))
        assert arr(ctv).any()
    meta = json.loads((out / "phantom.json").read_text())
    assert set(meta["cases"]) == {r["case_id"] for r in rows} and meta["region_labels"] == L
    assert meta["region_parts"]["axilla"] == list(LEVELS)
    summary = dataset.summarize(manifest)
    conserved = [(c, s) for c in meta["cases"].values() for s, f in c["sides"].items() if f["breast"] == "conserved"]
    assert summary["conserved_breasts"] == len(conserved) > 0
    assert summary["conserved_visible"] == round(np.mean([any(c["sides"][s][k] for k in SIGNS) for c, s in conserved]), 3)
    assert summary["conserved_visible_5mm"] <= summary["conserved_visible"]
    for row in rows:  # the axilla is written as its levels, never as one label
        present = set(np.unique(arr(sitk.ReadImage(str(manifest.parent / row["regions"])))).tolist())
        assert {L[f"{lv}_{s}"] for lv in LEVELS for s in ("left", "right")} <= present
        assert not present & {L[n] for n in UNSPLIT}
    # a phantom folder can be rewritten; a folder with someone else's manifest is refused, untouched
    dataset.write_dataset(2, out, seed=3, config=CONFIGS["coarse"], progress=False)
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(
        f"p3-000{i}_{k}.nii.gz" for i in range(2) for k in ("ct", "ctv", "regions"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("case_id,ct\nA,a.nii.gz\n")
    with pytest.raises(FileExistsError, match="not written by the phantom generator"):
        dataset.write_dataset(1, foreign, config=CONFIGS["coarse"], progress=False)
    assert (foreign / "manifest.csv").read_text() == "case_id,ct\nA,a.nii.gz\n"
    assert not (foreign / "cases").exists()


def test_cli_phantom_writes_a_dataset_and_prints_a_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mmcontour")
    phantom_cli.register(parser.add_subparsers(dest="command"))  # the same hook cli.main uses
    args = parser.parse_args(["phantom", "--n", "2", "--out", str(tmp_path / "ds"), "--seed", "4"])
    summary = args.func(args)
    printed = capsys.readouterr().out
    assert "wrote 2 phantom cases" in printed and "splits" in printed
    assert summary["n"] == 2 and sum(summary["splits"].values()) == 2 and summary["external"] is False
    assert (tmp_path / "ds" / "manifest.csv").is_file() and summary["manifest"].endswith("manifest.csv")
    json.dumps(summary)  # what cli.main prints with --json
    args = parser.parse_args(["phantom", "--n", "1", "--out", str(tmp_path / "ext"), "--external", "--json"])
    summary = args.func(args)
    assert capsys.readouterr().out == "" and summary["external"] is True
    assert summary["spacing"][2] == PhantomConfig.external_site().slice_thickness
    with pytest.raises(ValueError, match="at least 1"):
        args.func(parser.parse_args(["phantom", "--n", "0", "--out", str(tmp_path / "none")]))
    assert not (tmp_path / "none").exists()


def test_extra_bilateral_training_cases_merge_into_one_manifest(tmp_path, capsys):
    """`phantom --bilateral-share 1 --splits 1 0 0` writes only bilateral training cases; `merge-manifests`
    joins them with another set, paths rewritten so training reads both; clashes and bad values are refused."""
    from MMContourLib.cli.main import main
    from MMContourLib.data.manifest import read_cases

    assert main(["phantom", "--n", "3", "--out", str(tmp_path / "bil"), "--seed", "2", "--bilateral-share", "1",
                 "--splits", "1", "0", "0"]) == 0
    bilateral = read_cases(tmp_path / "bil" / "manifest.csv")
    assert [c.split for c in bilateral] == ["train"] * 3 and all(len(c.note.sides) == 2 for c in bilateral)
    assert main(["phantom", "--n", "3", "--out", str(tmp_path / "base"), "--seed", "4"]) == 0
    assert main(["phantom", "--n", "1", "--out", str(tmp_path / "x"), "--bilateral-share", "1.5"]) == 2
    assert "--bilateral-share must lie in [0, 1]" in capsys.readouterr().err
    out = tmp_path / "mixed" / "train.csv"
    out.parent.mkdir()
    assert main(["merge-manifests", str(tmp_path / "base" / "manifest.csv"), str(tmp_path / "bil" / "manifest.csv"),
                 "--out", str(out)]) == 0
    assert "wrote 6 cases from 2 manifest(s)" in capsys.readouterr().out
    merged = read_cases(out)
    assert [c.case_id for c in merged] == [f"p4-{i:04d}" for i in range(3)] + [f"p2-{i:04d}" for i in range(3)]
    same = lambda cases: [(c.ct.resolve(), c.ctv.resolve(), c.regions.resolve(), c.split, c.note) for c in cases]
    assert same(merged[3:]) == same(bilateral)
    assert out.read_text().count("../bil/cases/p2-0000_ct.nii.gz") == 1  # relative to the merged manifest
    assert main(["merge-manifests", str(tmp_path / "bil" / "manifest.csv"), "--out", str(out)]) == 2  # no overwrite
    assert main(["merge-manifests", str(tmp_path / "bil" / "manifest.csv"), str(tmp_path / "bil" / "manifest.csv"),
                 "--out", str(tmp_path / "twice.csv")]) == 2
    assert "case_id 'p2-0000' is also in" in capsys.readouterr().err and not (tmp_path / "twice.csv").exists()


def test_config_refuses_unknown_knob_values():
    with pytest.raises(ValueError, match="orientation_mix"):
        PhantomConfig(orientation_mix={"LAS": 1.0})
    with pytest.raises(ValueError, match="n_stage_probs"):
        PhantomConfig(n_stage_probs={"NX": 1.0})


def test_arms_down_phantoms_on_request(tmp_path, capsys):
    """`phantom --arms-up 0`: every patient lies with the arms down (planning CTs without a breast board); the
    share is recorded in phantom.json's config and per case; a share outside [0, 1] is refused."""
    import json

    from MMContourLib.cli.main import main

    assert main(["phantom", "--n", "2", "--out", str(tmp_path / "down"), "--seed", "5", "--arms-up", "0",
                 "--splits", "1", "0", "0", "--json"]) == 0
    record = json.loads((tmp_path / "down" / "phantom.json").read_text())
    assert record["config"]["arms_up_fraction"] == 0
    assert [c["arms"] for c in record["cases"].values()] == ["down", "down"]
    assert main(["phantom", "--n", "2", "--out", str(tmp_path / "up"), "--seed", "5", "--splits", "1", "0", "0",
                 "--json"]) == 0
    assert [c["arms"] for c in json.loads((tmp_path / "up" / "phantom.json").read_text())["cases"].values()] == ["up", "up"]
    assert main(["phantom", "--n", "1", "--out", str(tmp_path / "x"), "--arms-up", "1.5"]) == 2
    assert "--arms-up must lie in [0, 1]" in capsys.readouterr().err and not (tmp_path / "x").exists()
