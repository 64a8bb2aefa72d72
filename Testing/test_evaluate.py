"""Evaluation: metrics against hand-computed values, bootstrap CIs, clinical accuracy and text-following
on phantoms, and the command's files."""
import csv
import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MMContourLib.cli.main import main
from MMContourLib.training.evaluate import (EvalConfig, bootstrap_ci, clinical_check, counterfactual_notes, evaluate,
                                   region_coverage, segmentation_metrics, side_found, side_volumes, structure_dice)
from MMContourLib.note.clinical import ClinicalNote
from MMContourLib.data.phantom import PhantomConfig, generate_case
from MMContourLib.note.structures import structure_classes
from MMContourLib.note.targets import REGION_LABELS, UNKNOWN_CLASS, ctv_for_note, structure_label_map
from MMContourLib.data.phantom_dataset import write_dataset

COARSE = PhantomConfig(in_plane_spacing=6.0, slice_thickness=10.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def box_image(lo, hi, size=(20, 20, 20), spacing=(1.0, 1.0, 5.0), direction=None, origin=(0.0, 0.0, 0.0)):
    """A uint8 mask with ones in the index box [lo, hi) given in (x, y, z) order."""
    arr = np.zeros(size[::-1], np.uint8)
    arr[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


# -- metrics ----------------------------------------------------------------------------------------------

def test_dice_iou_hd95_match_hand_computed_values_in_mm():
    truth = box_image((5, 5, 5), (11, 11, 11))  # 6 x 6 x 6 voxels; spacing 1 x 1 x 5 mm
    shift_x = box_image((6, 5, 5), (12, 11, 11))
    m = segmentation_metrics(shift_x, truth)
    assert m["dice"] == pytest.approx(5 / 6) and m["iou"] == pytest.approx(5 / 7)
    assert m["hd95"] == pytest.approx(1.0)  # one voxel along x is 1 mm ...
    shift_z = box_image((5, 5, 6), (11, 11, 12))
    assert segmentation_metrics(shift_z, truth)["hd95"] == pytest.approx(5.0)  # ... along z 5 mm
    same = segmentation_metrics(truth, truth)
    assert same == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}

    empty = box_image((0, 0, 0), (0, 0, 0))
    m = segmentation_metrics(empty, truth)
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and math.isnan(m["hd95"])
    m = segmentation_metrics(empty, empty)
    assert m["dice"] == 1.0 and math.isnan(m["hd95"])


def test_bootstrap_ci_is_seeded_contains_the_mean_and_leaves_out_nan():
    values = [0.7, 0.8, 0.9, 0.85, 0.75, math.nan]
    ci = bootstrap_ci(values, n_resamples=1000, seed=1)
    assert ci["n"] == 5 and ci["excluded"] == 1
    assert ci["mean"] == pytest.approx(0.8)
    assert ci["ci_low"] < ci["mean"] < ci["ci_high"] and 0.7 <= ci["ci_low"] and ci["ci_high"] <= 0.9
    assert ci == bootstrap_ci(values, n_resamples=1000, seed=1)
    assert bootstrap_ci([0.5] * 4)["ci_low"] == bootstrap_ci([0.5] * 4)["ci_high"] == 0.5
    assert bootstrap_ci([math.nan])["mean"] is None


def test_side_volumes_follow_the_physical_x_axis_whatever_the_storage():
    # 4 x 4 x 4 voxels of 2 x 2 x 2 mm (0.512 cc) left of the midline ...
    lps = box_image((12, 0, 0), (16, 4, 4), size=(20, 4, 4), spacing=(2, 2, 2), origin=(-19.0, 0, 0))
    assert side_volumes(lps) == pytest.approx({"left_cc": 0.512, "right_cc": 0.0})
    # ... and the same voxels stored right-to-left: small x index is now the patient's left
    ras = box_image((4, 0, 0), (8, 4, 4), size=(20, 4, 4), spacing=(2, 2, 2), origin=(19.0, 0, 0),
                    direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert side_volumes(ras) == pytest.approx({"left_cc": 0.512, "right_cc": 0.0})


def test_side_found_on_hand_made_masks():
    # 20 x 4 x 4 voxels of 1 cc (10 mm), x from -95 to +95 mm: index 10 and above is the patient's left
    def mask(left_voxels, right_voxels):
        arr = np.zeros((4, 4, 20), np.uint8)
        arr[:, :, 10:10 + left_voxels // 16] = 1
        arr[:, :, 10 - right_voxels // 16:10] = 1
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((10.0, 10.0, 10.0))
        img.SetOrigin((-95.0, 0.0, 0.0))
        return side_volumes(img)

    left, right = ClinicalNote.parse("N0, breast conserving surgery, left side"), ClinicalNote.parse(
        "N2, total mastectomy surgery, right side")
    both = ClinicalNote.parse("N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side")
    all_left = mask(160, 0)
    assert all_left == pytest.approx({"left_cc": 160.0, "right_cc": 0.0})
    assert side_found(all_left, left) and not side_found(all_left, right) and not side_found(all_left, both)
    mostly = mask(144, 16)  # 90 % left
    assert side_found(mostly, left) and not side_found(mostly, both)
    split = mask(112, 48)  # 70 % left: not "mostly" for a unilateral note, both sides for a bilateral one
    assert not side_found(split, left) and not side_found(split, right) and side_found(split, both)
    assert side_found(split, left, share=0.6)
    assert not side_found(mask(0, 0), left) and not side_found(mask(0, 0), both)


# -- clinical accuracy ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phantom_left_bcs_n2():
    return generate_case(5, COARSE, note=ClinicalNote.parse("N2, breast conserving surgery, left side"))


def test_clinical_check_on_constructed_masks(phantom_left_bcs_n2):
    case = phantom_left_bcs_n2
    note, regions = case.note, case.regions
    cov = region_coverage(case.ctv, regions)
    assert cov["breast_left"] == 1.0 and cov["axilla_left"] == 1.0 and cov["breast_right"] == 0.0
    ok = clinical_check(cov, note)
    assert ok["correct"] and ok["sides_ok"] and ok["nodal_ok"] and ok["breast_vs_chestwall_ok"]
    assert ok["expected"] == sorted(["breast_left", "axilla_left", "supraclavicular_left", "internal_mammary_left"])

    def check(other_note):
        return clinical_check(region_coverage(ctv_for_note(regions, ClinicalNote.parse(other_note)), regions), note)

    wrong_side = check("N2, breast conserving surgery, right side")
    assert not wrong_side["sides_ok"] and not wrong_side["correct"]
    no_nodes = check("N0, breast conserving surgery, left side")
    assert no_nodes["sides_ok"] and not no_nodes["nodal_ok"] and no_nodes["breast_vs_chestwall_ok"]
    assert no_nodes["missing"] == ["axilla_left", "internal_mammary_left", "supraclavicular_left"]
    chest_wall = check("N2, total mastectomy surgery, left side")
    assert chest_wall["nodal_ok"] and not chest_wall["breast_vs_chestwall_ok"] and not chest_wall["correct"]

    # partial coverage: half of the breast is below the 0.5 threshold, and above a 0.4 one
    arr = sitk.GetArrayFromImage(case.ctv)
    breast = sitk.GetArrayViewFromImage(regions) == 1
    zs = np.nonzero(breast.any((1, 2)))[0]
    arr[zs[len(zs) // 2]:][breast[zs[len(zs) // 2]:]] = 0
    half = sitk.GetImageFromArray(arr)
    half.CopyInformation(case.ctv)
    cov = region_coverage(half, regions)
    assert 0.2 < cov["breast_left"] < 0.8
    assert clinical_check(cov, note, threshold=cov["breast_left"] - 0.01)["correct"]
    assert not clinical_check(cov, note, threshold=cov["breast_left"] + 0.01)["correct"]


def _hand_made_regions(split_axilla: bool = True) -> np.ndarray:
    """A (z, y, x) = (6, 4, 24) region map: on the left (x >= 12) breast 4 x 4 x 6 voxels, axilla levels 1-3
    (or the unsplit axilla) 4 x 4 x 2 each, supraclavicular and internal mammary 4 x 4 x 1 each, on the
    right a breast only."""
    r = np.zeros((6, 4, 24), np.uint8)
    r[:4, :, 12:18] = REGION_LABELS["breast_left"]
    for level, x0 in ((1, 18), (2, 20), (3, 22)):
        r[:4, :, x0:x0 + 2] = REGION_LABELS[f"axilla_l{level}_left" if split_axilla else "axilla_left"]
    r[4, :, 22] = REGION_LABELS["supraclavicular_left"]
    r[5, :, 12] = REGION_LABELS["internal_mammary_left"]
    r[:4, :, 4:10] = REGION_LABELS["breast_right"]
    return r


def test_per_structure_dice_on_a_hand_made_map():
    classes = structure_classes()
    regions = _hand_made_regions()
    note = ClinicalNote.parse("N2, breast conserving surgery, left side")
    label = lambda name: classes.index(name) + 1
    truth = structure_label_map(regions, note)
    pred = truth.copy()
    pred[:4, :2, 18:20] = 0  # half of level 1 missed (16 of 32 voxels)
    pred[:4, :, 20:22] = label("CTVn_L3_L")  # level 2 drawn as level 3
    pred[5, :, 12] = 0  # no internal mammary
    pred[:4, :, 4:6] = label("CTVp_Breast_R")  # 32 voxels of the right breast the note does not ask for
    dice, unscored = structure_dice(pred, classes, regions, note)
    assert unscored == []
    assert set(dice) == {"CTVp_Breast_L", "CTVn_L1_L", "CTVn_L2_L", "CTVn_L3_L", "CTVn_L4_L", "CTVn_IMN_L",
                         "CTVp_Breast_R"}  # the structures empty in both are not counted
    assert dice["CTVp_Breast_L"] == 1.0 and dice["CTVn_L4_L"] == 1.0
    assert dice["CTVn_L1_L"] == pytest.approx(2 * 16 / (16 + 32))
    assert dice["CTVn_L2_L"] == 0.0 and dice["CTVn_L3_L"] == pytest.approx(2 * 32 / (64 + 32))
    assert dice["CTVn_IMN_L"] == 0.0 and dice["CTVp_Breast_R"] == 0.0
    # the same on SimpleITK images
    as_image = lambda a: sitk.GetImageFromArray(a)
    assert structure_dice(as_image(pred), classes, as_image(regions), note)[0] == dice

    # N0: the nodal levels are not the note's: drawing level 1 scores 0 for it, the breast stays 1
    n0 = ClinicalNote.parse("N0, breast conserving surgery, left side")
    n0_pred = structure_label_map(regions, n0).copy()
    n0_pred[:4, :, 18:20] = label("CTVn_L1_L")
    dice, _ = structure_dice(n0_pred, classes, regions, n0)
    assert dice == {"CTVp_Breast_L": 1.0, "CTVn_L1_L": 0.0}


def test_unsplit_axilla_leaves_levels_unscored_and_coverage_groups_levels():
    classes = structure_classes()
    note = ClinicalNote.parse("N2, breast conserving surgery, left side")
    unsplit = _hand_made_regions(split_axilla=False)
    truth = structure_label_map(unsplit, note)
    assert (truth == UNKNOWN_CLASS).sum() == 3 * 32
    pred = np.where(truth == UNKNOWN_CLASS, classes.index("CTVn_L2_L") + 1, truth).astype(np.uint8)
    dice, unscored = structure_dice(pred, classes, unsplit, note)
    assert unscored == ["CTVn_L1_L", "CTVn_L2_L", "CTVn_L3_L"] and not set(dice) & set(unscored)
    assert dice["CTVp_Breast_L"] == 1.0

    # the targeted-regions check sees the axilla whole, split or not
    for regions in (_hand_made_regions(True), unsplit):
        image = sitk.GetImageFromArray(regions)
        ctv = ctv_for_note(image, note)
        coverage = region_coverage(ctv, image)
        assert coverage["axilla_left"] == 1.0 and "axilla_l1_left" not in coverage
        assert clinical_check(coverage, note)["correct"]
        # level 3 left out: 2/3 of the axilla is still targeted, the note without nodes is not followed
        arr = sitk.GetArrayFromImage(ctv)
        arr[:4, :, 22:24] = 0
        cut = sitk.GetImageFromArray(arr)
        assert region_coverage(cut, image)["axilla_left"] == pytest.approx(2 / 3)
        assert not clinical_check(region_coverage(cut, image), ClinicalNote.parse(
            "N0, breast conserving surgery, left side"))["nodal_ok"]
    parts = region_coverage(cut, sitk.GetImageFromArray(_hand_made_regions(True)), parts=True)
    assert parts["axilla_l1_left"] == 1.0 and parts["axilla_l3_left"] == 0.0 and parts["axilla_left"] == pytest.approx(2 / 3)
    assert clinical_check(parts, note)["correct"]  # parts are left out of the check


def test_counterfactual_notes_flip_side_and_nodes():
    cf = counterfactual_notes(ClinicalNote.parse("N1mi, total mastectomy surgery, right side, cT2"))
    assert cf["side"].to_prompt() == "N1mi, total mastectomy surgery, left side"
    assert cf["nodes"].to_prompt() == "N2, total mastectomy surgery, right side"
    bilateral = ClinicalNote.parse("N0, breast conserving surgery, left side; N3, total mastectomy surgery, right side")
    cf = counterfactual_notes(bilateral)
    assert "side" not in cf
    assert cf["nodes"].to_prompt() == "N2, breast conserving surgery, left side; N0, total mastectomy surgery, right side"


# -- the whole evaluation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    return write_dataset(4, tmp_path_factory.mktemp("phantoms"), seed=3, config=COARSE,
                         split_fractions=(0, 0, 1), progress=False)


class FakeContourer:
    """Contours from the phantom's own region map: ``follow_note`` True gives the guideline CTV of whatever
    note it is asked about (a perfect multimodal model); False always gives the case's true CTV (a model
    that ignores the note)."""

    def __init__(self, manifest, follow_note: bool):
        from MMContourLib.data.manifest import read_cases as read_manifest
        from MMContourLib.image.readwrite import read_image

        self.follow_note = follow_note
        self.cases = {}
        for case in read_manifest(manifest):
            ct = read_image(case.ct)
            self.cases[self._key(ct)] = (read_image(case.regions), case.note)
        self.bundle = SimpleNamespace(name="oracle" if follow_note else "note-blind", bundle_id="fake",
                                      text_encoder=SimpleNamespace(kind="none"))

    @staticmethod
    def _key(ct):
        return hashlib.sha1(sitk.GetArrayViewFromImage(ct).tobytes()).hexdigest()

    def contour(self, ct, note):
        regions, true_note = self.cases[self._key(ct)]
        # the note-blind model at least says when it was asked for another note than the one it draws
        ignored = [SimpleNamespace(kind="note", structure=None, line=lambda: "note ignored")] \
            if not self.follow_note and note != true_note else []
        return SimpleNamespace(mask=ctv_for_note(regions, note if self.follow_note else true_note),
                               review=SimpleNamespace(reasons=ignored))


class FakeStructureContourer(FakeContourer):
    """A per-structure oracle: the guideline structures of the note it is asked about, as labels (voxels of an
    unsplit axilla drawn as level 2)."""

    def contour(self, ct, note):
        regions, _ = self.cases[self._key(ct)]
        classes = structure_classes()
        labels = sitk.GetArrayFromImage(structure_label_map(regions, note))
        r = sitk.GetArrayViewFromImage(regions)
        for side in ("left", "right"):
            labels[(labels == UNKNOWN_CLASS) & (r == REGION_LABELS[f"axilla_{side}"])] = \
                classes.index(f"CTVn_L2_{side[0].upper()}") + 1
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(regions)
        return SimpleNamespace(mask=ctv_for_note(regions, note), labels=image, classes=classes)


def test_evaluate_scores_a_note_following_model_above_a_note_blind_one(phantom_manifest, tmp_path):
    fakes = {"oracle": FakeContourer(phantom_manifest, True), "blind": FakeContourer(phantom_manifest, False)}
    config = EvalConfig(manifest=str(phantom_manifest), out=str(tmp_path / "eval"), bundles=["oracle", "blind"],
                        split="test", n_bootstrap=200, progress=False)
    metrics = evaluate(config, contourer_factory=lambda name: fakes[name])
    oracle, blind = metrics["models"]
    assert metrics["n_cases"] == 4 and oracle["model"] == "oracle" and blind["model"] == "note-blind"
    for model in (oracle, blind):  # both give the true CTV for the true note
        assert model["dice"]["mean"] == 1.0 and model["hd95_mm"]["mean"] == 0.0
        assert model["clinical"]["correct"]["mean"] == 1.0
    tf_oracle, tf_blind = oracle["text_following"], blind["text_following"]
    assert tf_oracle["nodes"]["follows"]["mean"] == 1.0 and tf_oracle["all"]["follows"]["mean"] == 1.0
    assert tf_oracle["nodes"]["dice_vs_truth"]["mean"] == 1.0
    assert tf_blind["nodes"]["follows"]["mean"] == 0.0 and tf_blind["all"]["follows"]["mean"] == 0.0
    assert tf_oracle["side"]["follows"]["mean"] == 1.0 and tf_blind["side"]["follows"]["mean"] == 0.0
    # the notes not followed, and how many of those the review flagged (the blind fake flags each)
    assert tf_oracle["side"]["not_followed"] == 0 and tf_oracle["nodes"]["not_followed_flagged"] == 0
    assert tf_blind["nodes"]["not_followed"] == 4 and tf_blind["nodes"]["not_followed_flagged"] == 4
    assert tf_blind["side"]["not_followed"] == tf_blind["side"]["not_followed_flagged"] > 0

    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text())["models"][0]["model"] == "oracle"
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert len(rows) == 8 and {r["model"] for r in rows} == {"oracle", "note-blind"}
    assert all(r["clinical_correct"] == "True" for r in rows)
    table = (out / "table.md").read_text()
    assert "| Model | Dice | IoU | HD95 (mm) | Clinical accuracy |" in table
    assert "| oracle | 1.000 (1.000-1.000) | 1.000 (1.000-1.000) | 0.00 (0.00-0.00) | 1.000 (1.000-1.000) |" in table
    assert table.rstrip().endswith(f"| note-blind | 0.00 (0.00-0.00) | 0.00 (0.00-0.00) | 0.00 (0.00-0.00) | "
                                   f"{tf_blind['side']['not_followed']}/{tf_blind['side']['not_followed']} / 4/4 |")
    assert len(list((out / "overlays" / "oracle").glob("*.png"))) == 4
    for model in (oracle, blind):  # the contour of the true note lies on the treated side(s)
        assert model["side_found"]["mean"] == 1.0
        assert model["structures"] == {"available": False, "why": "single-CTV bundle (one output): no per-structure "
                                                                  "contours to score"}
    assert "| Model | Text encoder | Side found, all cases | Side found, unilateral cases |" in table
    assert "Per-structure Dice, oracle: single-CTV bundle" in table
    assert all(r["side_found"] == "True" and r["per_structure"] == "False" for r in rows)


def test_evaluate_reports_per_structure_dice_of_a_per_structure_bundle(phantom_manifest, tmp_path):
    fake = FakeStructureContourer(phantom_manifest, True)
    metrics = evaluate(EvalConfig(manifest=str(phantom_manifest), out=str(tmp_path / "s"), bundles=["x"], n_bootstrap=50,
                                  overlays=False, counterfactuals=False, progress=False),
                       contourer_factory=lambda name: fake)
    per = metrics["models"][0]["structures"]
    assert per["available"] and per["cases"] == 4 and per["mean_dice"]["mean"] == 1.0
    cases = read_cases_of(phantom_manifest)
    drawn = {n for c in cases for n in _structures_of(c)}
    assert set(per["dice"]) == drawn and all(d["mean"] == 1.0 for d in per["dice"].values())
    rows = list(csv.DictReader(open(tmp_path / "s" / "cases.csv")))
    assert all(r["per_structure"] == "True" and float(r["dice_structures_mean"]) == 1.0 for r in rows)
    for row, case in zip(rows, cases):
        assert {k[5:] for k in row if k.startswith("dice_C") and row[k] != ""} == set(_structures_of(case))
    table = (tmp_path / "s" / "table.md").read_text()
    assert "| Structure | oracle |" in table
    assert any(line.startswith("| CTVp_") and "1.000 (1.000-1.000) [n=" in line for line in table.splitlines())


def read_cases_of(manifest):
    from MMContourLib.data.manifest import read_cases

    return read_cases(manifest)


def _structures_of(case):
    """The structures scored for a phantom case: the note's, less levels 1-3 of an unsplit axilla."""
    from MMContourLib.image.readwrite import read_image
    from MMContourLib.note.targets import structures_for_note

    regions = sitk.GetArrayViewFromImage(read_image(case.regions))
    unsplit = {s for s in ("left", "right") if (regions == REGION_LABELS[f"axilla_{s}"]).any()}
    levels = {f"CTVn_L{k}_{s[0].upper()}" for s in unsplit for k in (1, 2, 3)}
    return [n for n in structures_for_note(case.note) if n not in levels]


def test_without_regions_only_segmentation_metrics_and_side_following(phantom_manifest, tmp_path):
    rows = list(csv.DictReader(open(phantom_manifest)))
    plain = phantom_manifest.parent / "no-regions.csv"
    with open(plain, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "regions"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fake = FakeContourer(phantom_manifest, True)
    metrics = evaluate(EvalConfig(manifest=str(plain), out=str(tmp_path / "plain"), bundles=["x"], n_bootstrap=50,
                                  overlays=False, progress=False), contourer_factory=lambda name: fake)
    model = metrics["models"][0]
    assert model["dice"]["mean"] == 1.0 and "clinical" not in model
    assert set(model["text_following"]) == {"side"} and model["text_following"]["side"]["follows"]["mean"] == 1.0
    assert not (tmp_path / "plain" / "overlays").exists()


def test_evaluate_command_with_a_real_bundle(tiny_bundle, phantom_manifest, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["evaluate", "--bundle", str(tiny_bundle), "--manifest", str(phantom_manifest), "--out", str(out),
                 "--device", "cpu", "--bootstrap", "100", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    model = summary["models"][0]
    assert model["model"] == "tiny-test" and model["dice"]["n"] + model["dice"]["excluded"] == 4
    assert 0.0 <= model["dice"]["mean"] <= 1.0 and model["clinical"]["correct"]["n"] == 4
    assert set(model["text_following"]) >= {"nodes", "all"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"][0]["bundle_id"] and metrics["bootstrap"]["resamples"] == 100
    png = next((out / "overlays" / "tiny-test").glob("*.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_a_real_per_structure_bundle(phantom_manifest, tmp_path, tiny_vision_bundle):
    from MMContourLib.bench.fixtures import make_bundle

    bundle = make_bundle(tmp_path / "per-structure", None, structures=structure_classes(), name="tiny-structures")
    metrics = evaluate(EvalConfig(manifest=str(phantom_manifest), out=str(tmp_path / "real"),
                                  bundles=[str(bundle), str(tiny_vision_bundle)], n_bootstrap=50, overlays=False,
                                  counterfactuals=False, progress=False, device="cpu"))
    structures, single = (m["structures"] for m in metrics["models"])
    assert single == {"available": False, "why": "single-CTV bundle (one output): no per-structure contours to score"}
    assert structures["available"] and structures["cases"] == 4
    assert set(structures["dice"]) <= set(structure_classes())
    assert all(0.0 <= d["mean"] <= 1.0 and d["n"] >= 1 for d in structures["dice"].values())
    for model in metrics["models"]:
        assert 0.0 <= model["side_found"]["mean"] <= 1.0 and model["side_found"]["n"] == 4
    rows = list(csv.DictReader(open(tmp_path / "real" / "cases.csv")))
    assert [r["per_structure"] for r in rows] == ["True"] * 4 + ["False"] * 4
    # the confidence measures behind the flags come along (per structure drawn, for the per-structure bundle)
    assert all(float(r["uncertain_ratio"]) > 0 for r in rows)  # a random network is unsure everywhere
    drawn = [k for k in rows[0] if k.startswith("uncertain_CTV")]
    assert drawn and set(k[len("uncertain_"):] for k in drawn) <= set(structure_classes())
    assert any(float(r[k]) > 0 for r in rows[:4] for k in drawn if r[k])
    assert all(r[k] == "" for r in rows[4:] for k in drawn)  # the single-CTV bundle has none
    left_out = [k for k in rows[0] if k.startswith("left_out_CTV")]  # what the left-out check judges, per structure
    assert {k[len("left_out_"):] for k in left_out} == {k[len("uncertain_"):] for k in drawn}
    assert all(float(r[k]) >= 0 for r in rows[:4] for k in left_out if r[k])
    assert all(r[k] == "" for r in rows[4:] for k in left_out)
    table = (tmp_path / "real" / "table.md").read_text()
    assert "| Structure | tiny-structures | tiny-test |" in table
    assert "tiny-test: single-CTV bundle (one output): no per-structure contours to score." in table


def test_review_flag_rates_count_wrong_and_right_contours_flagged():
    from MMContourLib.training.evaluate import review_flag_rates

    rows = [{"clinical": {"correct": False}, "needs_review": True, "review_kinds": "note/structure"},
            {"clinical": {"correct": False}, "needs_review": False, "review_kinds": ""},
            {"clinical": {"correct": True}, "needs_review": True, "review_kinds": "confidence;note/structure"},
            {"clinical": {"correct": True}, "needs_review": False, "review_kinds": ""},
            {"clinical": {"correct": True}, "needs_review": False, "review_kinds": ""}]
    rates = review_flag_rates(rows)
    assert rates["any"] == {"wrong": 2, "wrong_flagged": 1, "right": 3, "right_flagged": 1,
                            "sensitivity": 0.5, "false_flag_rate": 1 / 3}
    assert rates["by_kind"]["note/structure"]["wrong_flagged"] == 1
    assert rates["by_kind"]["confidence"] == {"wrong": 2, "wrong_flagged": 0, "right": 3, "right_flagged": 1,
                                              "sensitivity": 0.0, "false_flag_rate": 1 / 3}
