"""Review flags: a CT outside the bundle's training range, an uncertain contour, an implausible volume;
the range recorded by a real training run; the review in the summary and on the predict line."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_bundle, make_ct
from test_train import tiny_config, write_cases

from MMContourLib.cli.main import main
from MMContourLib.data.manifest import read_cases
from MMContourLib.image.ctstats import ct_statistics, training_range
from MMContourLib.image.readwrite import read_image
from MMContourLib.inference.contourer import Contourer
from MMContourLib.inference.review import ReviewConfig, review_contour, uncertain_ratio, volume_reason
from MMContourLib.model.bundle import ModelBundle
from MMContourLib.note.clinical import ClinicalNote, note_from_any
from MMContourLib.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
NOTE = "N0, breast conserving surgery, left side"


def ct_with_slices(mm: float, seed: int = 0) -> sitk.Image:
    """The conftest CT (4 x 4 mm pixels) with ``mm`` slices over the same ~144 mm S-I."""
    return make_ct(size=(48, 40, int(round(144 / mm))), spacing=(4.0, 4.0, mm), seed=seed)


@pytest.fixture(scope="module")
def trained_on_5mm(tmp_path_factory):
    """A vision-only bundle whose training block records CTs like ct_with_slices(5.0)."""
    path = make_bundle(None, tmp_path_factory.mktemp("range") / "b")
    bundle = ModelBundle.load(path)
    bundle.training = {"ct_range": training_range(ct_statistics(ct_with_slices(5.0, seed=s)) for s in range(3))}
    bundle.save(path)
    return path


def input_reasons(result):
    return [r for r in result.review.reasons if r.kind == "input"]


def test_statistics_are_in_patient_axes_of_the_original_grid():
    ct = make_ct(size=(48, 40, 24), spacing=(4.0, 4.0, 6.0))
    stats = ct_statistics(ct)
    assert stats["spacing_mm"] == [4.0, 4.0, 6.0] and stats["fov_mm"] == [192.0, 160.0, 144.0]
    assert stats["hu_p1"] < stats["hu_p50"] < stats["hu_p99"] and -100 < stats["hu_p50"] < 100
    # body ellipse: 0.84 x 0.70 of the field of view, wider than deep
    assert 140 < stats["body_width_mm"] < 180 and 95 < stats["body_depth_mm"] < 125
    # stored slices first (S-I along the first axis): the same patient axes come out
    arr = sitk.GetArrayFromImage(ct).transpose(1, 2, 0)  # (y, x, z) -> image axes (z, x, y)
    flipped = sitk.GetImageFromArray(arr)
    flipped.SetSpacing((6.0, 4.0, 4.0))
    flipped.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))
    again = ct_statistics(flipped)
    assert again["spacing_mm"] == [4.0, 4.0, 6.0] and again["fov_mm"] == [192.0, 160.0, 144.0]


def test_8mm_slices_flagged_when_trained_on_5mm(trained_on_5mm, capsys, tmp_path):
    contourer = Contourer.from_bundle(trained_on_5mm, device="cpu")
    result = contourer.contour(ct_with_slices(8.0), NOTE)
    reasons = input_reasons(result)
    assert len(reasons) == 1, [r.text for r in reasons]
    assert "8.0 mm apart" in reasons[0].text and "trained on 5.0 mm" in reasons[0].text
    assert reasons[0].structure is None
    summary = result.summary()["review"]
    assert summary["needs_review"] is True and reasons[0].text in summary["reasons"]
    assert json.loads(json.dumps(summary)) == summary

    ct_file = tmp_path / "ct8.nii.gz"
    sitk.WriteImage(ct_with_slices(8.0), str(ct_file))
    code = main(["predict", "--ct", str(ct_file), "--note", NOTE, "--bundle", str(trained_on_5mm),
                 "--out", str(tmp_path / "ctv.seg.nrrd"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    review_line = [line for line in out.splitlines() if line.startswith("REVIEW: ")]
    assert len(review_line) == 1 and "8.0 mm apart" in review_line[0]


def test_ct_inside_the_range_is_not_flagged(trained_on_5mm):
    contourer = Contourer.from_bundle(trained_on_5mm, device="cpu")
    for ct in (ct_with_slices(5.0, seed=9), ct_with_slices(3.0, seed=9)):  # finer slices lose nothing
        result = contourer.contour(ct, NOTE)
        assert input_reasons(result) == [] and result.review.notes == []


def test_bundle_without_a_range_gives_no_input_flag_and_says_so(tiny_vision_bundle):
    assert "ct_range" not in ModelBundle.load(tiny_vision_bundle).training
    result = Contourer.from_bundle(tiny_vision_bundle, device="cpu").contour(ct_with_slices(8.0), NOTE)
    assert input_reasons(result) == []
    assert any("records no training range" in n for n in result.summary()["review"]["notes"])


def _sphere_review(ramp_mm: float, config: ReviewConfig = ReviewConfig()):
    """A 40 mm-radius sphere whose probability falls from 1 to 0 over ``ramp_mm`` around its surface, reviewed
    with ``config``."""
    ct = make_ct(size=(48, 40, 24), spacing=(4.0, 4.0, 6.0))
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(ct.GetSize()[::-1], ct.GetSpacing()[::-1])),
                          indexing="ij")
    r = np.sqrt((x - 96) ** 2 + (y - 80) ** 2 + (z - 72) ** 2)
    p = np.clip(0.5 - (r - 40) / ramp_mm, 0, 1).astype(np.float32)
    prob = sitk.GetImageFromArray(p)
    prob.CopyInformation(ct)
    mask = sitk.GetImageFromArray((p >= 0.5).astype(np.uint8))
    mask.CopyInformation(ct)
    return review_contour(ct, prob, mask, note_from_any(NOTE), None, config=config)


def test_uncertainty_flag_on_constructed_probabilities():
    sharp, blurred = _sphere_review(ramp_mm=4.0), _sphere_review(ramp_mm=80.0)
    threshold = ReviewConfig().max_uncertain_ratio
    assert sharp.measures["uncertain_ratio"] < threshold < blurred.measures["uncertain_ratio"]
    assert not [r for r in sharp.reasons if r.kind == "confidence"]
    (reason,) = [r for r in blurred.reasons if r.kind == "confidence"]
    assert "unsure" in reason.text and "per 100 contour voxels" in reason.text
    assert uncertain_ratio(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2), bool)) is None


def test_volume_flags_follow_the_note():
    unilateral = note_from_any(NOTE)
    assert "empty" in volume_reason(0.0, unilateral).text
    assert "less than the 50 cc" in volume_reason(20.0, unilateral).text
    assert volume_reason(800.0, unilateral) is None
    assert "more than the 3000 cc" in volume_reason(3500.0, unilateral).text
    bilateral = ClinicalNote.from_fields(side="bilateral", n_stage="left:N0;right:ypN2", surgery="left:BCS;right:MRM")
    assert len(bilateral.sides) == 2 and volume_reason(3500.0, bilateral) is None
    assert volume_reason(20.0, unilateral, structure="CTVp_Breast_L").line().startswith("CTVp_Breast_L: ")


def test_training_records_the_range_of_its_ct(tmp_path, tiny_llm_dir):
    manifest = write_cases(tmp_path / "data", n=4, n_val=1)
    result = train(tiny_config(manifest, tmp_path / "run", tiny_llm_dir, epochs=1))
    recorded = ModelBundle.load(result.last).training["ct_range"]
    cases = read_cases(manifest, split="train")
    expected = training_range(ct_statistics(read_image(c.ct)) for c in cases)
    assert recorded == json.loads(json.dumps(expected)) and recorded["cases"] == 3
    assert recorded["spacing_mm"] == [[4.0, 4.0], [4.0, 4.0], [6.0, 6.0]]
    assert set(recorded) >= {"fov_mm", "hu_p1", "hu_p50", "hu_p99", "body_width_mm", "body_depth_mm"}
    # prediction measures a training CT the same way: inside its own range
    contoured = Contourer.from_bundle(result.last, llm=str(tiny_llm_dir), device="cpu").contour(
        read_image(cases[0].ct), cases[0].note)
    assert input_reasons(contoured) == []


def test_what_the_anatomical_range_step_removed_is_a_reason_above_a_few_cc():
    from MMContourLib.inference.review import dropped_reason

    report = {"dropped_cc": 20.4, "components": [{"cc": 20.4, "reason": "caudal to the lung bases"}]}
    reason = dropped_reason(report)
    assert reason.kind == "anatomical-range" and "20.4 cc" in reason.text and "caudal to the lung bases" in reason.text
    assert dropped_reason({"dropped_cc": 3.0, "components": [{"cc": 3.0, "reason": "far from the target"}]}) is None
    assert dropped_reason({}) is None


# -- per structure: note consistency and confidence -----------------------------------------------

def _volumes(**drawn):
    """{structure: cc} for every class of the structure table, 0 except ``drawn``."""
    from MMContourLib.note.structures import structure_classes

    volumes = {name: 0.0 for name in structure_classes()}
    assert set(drawn) <= set(volumes)
    volumes.update(drawn)
    return volumes


def _note_reasons(note_text, training=None, **drawn):
    from MMContourLib.inference.review import structure_reasons
    from MMContourLib.note.targets import structures_for_note

    note = note_from_any(note_text)
    return {r.structure: r for r in structure_reasons(_volumes(**drawn), structures_for_note(note), note, training)}


def test_n0_note_with_a_nodal_level_drawn_is_flagged_note():
    reasons = _note_reasons(NOTE, CTVp_Breast_L=600.0, CTVn_L1_L=20.0, CTVn_IMN_L=3.0)
    assert set(reasons) == {"CTVn_L1_L"}  # 3 cc of IMN: the partial-volume rim, below max_excluded_cc
    reason = reasons["CTVn_L1_L"]
    assert reason.kind == "note" and reason.line().startswith("CTVn_L1_L: 20 cc drawn")
    assert "left side (N0, breast conserving surgery: no nodal levels)" in reason.text
    n1mi = _note_reasons("N1mi, total mastectomy surgery, right side", CTVp_ChestWall_R=300.0, CTVn_L2_R=12.0)
    assert set(n1mi) == {"CTVn_L2_R"} and "N1mi is treated as N0" in n1mi["CTVn_L2_R"].text
    other_side = _note_reasons(NOTE, CTVp_Breast_L=600.0, CTVp_Breast_R=40.0)
    assert set(other_side) == {"CTVp_Breast_R"} and "treats only the left side" in other_side["CTVp_Breast_R"].text
    wrong_local = _note_reasons(NOTE, CTVp_Breast_L=600.0, CTVp_ChestWall_L=80.0)
    assert set(wrong_local) == {"CTVp_ChestWall_L"} and "no nodal levels" not in wrong_local["CTVp_ChestWall_L"].text


def test_a_breast_drawn_where_the_note_says_mastectomy_names_the_disagreement():
    """A mastectomy note on the side of an intact breast (wrong side or surgery in the note): the model draws
    the breast it sees; the review says the note and the CT disagree, not merely 'delete it'."""
    note = "N0, total mastectomy surgery, right side"
    reasons = _note_reasons(note, CTVp_Breast_R=405.0, CTVp_ChestWall_R=0.3)
    assert set(reasons) == {"CTVp_Breast_R", "CTVp_ChestWall_R"}
    text = reasons["CTVp_Breast_R"].text
    assert text.startswith("405 cc of breast drawn where the note says total mastectomy (right side)")
    assert "check the note's side and surgery" in text and reasons["CTVp_Breast_R"].kind == "note"
    assert reasons["CTVp_ChestWall_R"].text.startswith("missing")
    # a breast on the other, untreated side is the ordinary excluded-structure reason
    other = _note_reasons(note, CTVp_ChestWall_R=300.0, CTVp_Breast_L=50.0)
    assert set(other) == {"CTVp_Breast_L"} and "treats only the right side" in other["CTVp_Breast_L"].text


def test_expected_structure_missing_or_far_below_or_above_training_is_flagged():
    n2 = "N2, breast conserving surgery, left side"
    full = dict(CTVp_Breast_L=600.0, CTVn_L1_L=30.0, CTVn_L2_L=15.0, CTVn_L3_L=8.0, CTVn_L4_L=10.0, CTVn_IMN_L=4.0)
    assert _note_reasons(n2, **full) == {}
    missing = _note_reasons(n2, **{**full, "CTVn_L4_L": 0.0, "CTVn_IMN_L": 0.1})
    assert set(missing) == {"CTVn_L4_L", "CTVn_IMN_L"}
    assert "drew none" in missing["CTVn_L4_L"].text and "only 0.10 cc" in missing["CTVn_IMN_L"].text
    assert all(r.kind == "note" and r.text.startswith("missing") for r in missing.values())
    training = {"structures": {"volume_cc": {"CTVn_L1_L": [40.0, 60.0, 90.0]}}}
    small = _note_reasons(n2, training, **{**full, "CTVn_L1_L": 6.0})
    assert set(small) == {"CTVn_L1_L"} and "below 25 % of the smallest seen in training (40.0 cc)" in small["CTVn_L1_L"].text
    assert _note_reasons(n2, training, **{**full, "CTVn_L1_L": 12.0}) == {}  # 30 % of 40 cc
    # far above the largest seen in training: spread beyond the structure (the demo's level 4, v11: 68 cc)
    large = _note_reasons(n2, training, **{**full, "CTVn_L1_L": 200.0})
    assert set(large) == {"CTVn_L1_L"} and large["CTVn_L1_L"].kind == "note"
    assert large["CTVn_L1_L"].text.startswith("200 cc, more than 2 times the largest seen in training (90 cc)")
    assert _note_reasons(n2, training, **{**full, "CTVn_L1_L": 170.0}) == {}  # 1.9 times: a large patient
    assert _note_reasons(n2, None, **{**full, "CTVn_L1_L": 900.0}) == {}  # no training sizes: nothing to compare


def test_bilateral_note_expects_each_sides_structures():
    from MMContourLib.note.targets import structures_for_note

    note = "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side"
    expected = structures_for_note(note_from_any(note))
    assert set(expected) == {"CTVp_Breast_L", "CTVp_ChestWall_R", "CTVn_L1_R", "CTVn_L2_R", "CTVn_L3_R", "CTVn_L4_R",
                             "CTVn_IMN_R"}
    drawn = dict(CTVp_Breast_L=600.0, CTVp_ChestWall_R=300.0, CTVn_L1_R=30.0, CTVn_L2_R=15.0, CTVn_L3_R=8.0,
                 CTVn_L4_R=10.0, CTVn_IMN_R=4.0)
    assert _note_reasons(note, **drawn) == {}
    wrong = _note_reasons(note, **{**drawn, "CTVp_Breast_L": 0.0, "CTVn_L1_L": 25.0})
    assert set(wrong) == {"CTVp_Breast_L", "CTVn_L1_L"}
    assert "missing" in wrong["CTVp_Breast_L"].text and "left side (N0" in wrong["CTVn_L1_L"].text


def _ball_probability(shape, centre, radius, ramp):
    """p = 1 inside a ball of ``radius`` voxels, falling linearly to 0 over ``ramp`` voxels at its border."""
    idx = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum((idx[a] - c) ** 2 for a, c in enumerate(centre)))
    return np.clip(0.5 - (r - radius) / ramp, 0, 1).astype(np.float32)


def test_structure_confidence_on_constructed_probabilities():
    from MMContourLib.inference.review import structure_confidence_reasons

    shape = (60, 40, 40)
    sharp = _ball_probability(shape, (15, 20, 20), 10, ramp=1.0)
    blurred = _ball_probability(shape, (45, 20, 20), 10, ramp=16.0)
    tiny = _ball_probability(shape, (5, 5, 5), 1.5, ramp=16.0)
    prob = np.stack([sharp, blurred, tiny, np.zeros(shape, np.float32)])
    classes = ("CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_L", "CTVn_L4_L")
    voxel_cc = 0.027  # 3 x 3 x 3 mm
    reasons, measures = structure_confidence_reasons(prob, classes, voxel_cc)
    assert set(measures) == {"CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_L"}  # nothing drawn of L4
    ball_cc = 4 / 3 * np.pi * 10 ** 3 * voxel_cc
    assert measures["CTVp_Breast_L"]["volume_cc"] == pytest.approx(ball_cc, rel=0.05)
    sharp_ratio, blurred_ratio = measures["CTVp_Breast_L"]["uncertain_ratio"], measures["CTVn_L1_L"]["uncertain_ratio"]
    threshold = ReviewConfig().max_structure_uncertain_ratio
    assert sharp_ratio < threshold < blurred_ratio
    assert measures["CTVn_IMN_L"]["volume_cc"] < ReviewConfig().min_confidence_cc  # all border, but too small to flag
    assert measures["CTVn_IMN_L"]["uncertain_ratio"] > threshold
    (reason,) = reasons
    assert reason.kind == "confidence" and reason.structure == "CTVn_L1_L"
    assert reason.line().startswith("CTVn_L1_L: the model is unsure") and f"of its {measures['CTVn_L1_L']['volume_cc']:.0f} cc" in reason.text
    # judged by the contour as written: a structure the contour does not hold (the note check calls it
    # missing) is not also "unsure" with a model-grid volume nobody can see
    drawn = {"CTVp_Breast_L": measures["CTVp_Breast_L"]["volume_cc"], "CTVn_L1_L": 0.0}
    assert structure_confidence_reasons(prob, classes, voxel_cc, drawn=drawn)[0] == []
    # a structure is where it wins: where the blurred one outweighs the sharp one, it owns the voxels
    both = np.stack([sharp, np.where(sharp > 0, 0.9, 0).astype(np.float32)])
    _, owned = structure_confidence_reasons(both, classes[:2], voxel_cc)
    assert "CTVp_Breast_L" in owned and owned["CTVn_L1_L"]["volume_cc"] < owned["CTVp_Breast_L"]["volume_cc"]
    with pytest.raises(ValueError, match="K = 3"):
        structure_confidence_reasons(prob, classes[:3], voxel_cc)


def _left_out_probability():
    """Two 10-voxel cubes of probability 0.9 (27 cc each at 3 mm): A with a 2-voxel shell of 0.3 around it, outside
    the contour (the model half-believes A goes further), B with none."""
    prob = np.zeros((2, 40, 40, 40), np.float32)
    prob[0, 8:22, 8:22, 8:22] = 0.3
    prob[0, 10:20, 10:20, 10:20] = 0.9
    prob[1, 25:35, 25:35, 25:35] = 0.9
    return prob, ("CTVn_L1_L", "CTVn_L3_L"), 0.027


def test_structure_left_out_against_its_own_reference():
    """A calibrated bundle judges each structure by what it leaves out (probability 0.2 up to the threshold,
    outside the contour) against that structure's own reference: flagged above ``max_left_out_factor`` times it,
    with the cc and the multiple in the line; not by the absolute uncertain ratio, which would flag the shell too;
    a structure without a reference is measured, not flagged."""
    from MMContourLib.inference.review import structure_confidence_reasons

    prob, classes, voxel_cc = _left_out_probability()
    shell = 14 ** 3 - 10 ** 3
    unsure, measures = structure_confidence_reasons(prob, classes, voxel_cc)  # no references: the absolute ratio
    assert measures["CTVn_L1_L"]["left_out_ratio"] == pytest.approx(shell / 1000, abs=1e-4)
    assert measures["CTVn_L1_L"]["left_out_cc"] == pytest.approx(shell * voxel_cc, abs=0.01)
    assert measures["CTVn_L3_L"]["left_out_ratio"] == 0 and measures["CTVn_L3_L"]["volume_cc"] == pytest.approx(27.0)
    assert [r.structure for r in unsure] == ["CTVn_L1_L"] and "unsure" in unsure[0].text
    low = ReviewConfig(left_out_reference={"CTVn_L1_L": 0.5, "CTVn_L3_L": 0.5})
    (reason,) = structure_confidence_reasons(prob, classes, voxel_cc, low)[0]
    assert reason.kind == "confidence" and reason.structure == "CTVn_L1_L"
    assert reason.text.startswith("may be drawn too small: 47.1 cc outside the contour have probability 0.2-0.5")
    assert "3.5 times what the model leaves out of it on right contours (flagged above 2)" in reason.text
    # a structure the note's guideline excludes is the note check's ("delete it"), never also "drawn too small"
    assert structure_confidence_reasons(prob, classes, voxel_cc, low, expected=("CTVn_L3_L",))[0] == []
    assert len(structure_confidence_reasons(prob, classes, voxel_cc, low, expected=classes)[0]) == 1
    usual = ReviewConfig(left_out_reference={"CTVn_L1_L": 1.0})  # 1.744 is under 2 x 1.0: its usual
    assert structure_confidence_reasons(prob, classes, voxel_cc, usual)[0] == []
    assert structure_confidence_reasons(prob, classes, voxel_cc, ReviewConfig(left_out_reference={"CTVn_L3_L": 0.01}))[0] == []
    strict = ReviewConfig(left_out_reference={"CTVn_L1_L": 1.0}, max_left_out_factor=1.5)
    assert [r.structure for r in structure_confidence_reasons(prob, classes, voxel_cc, strict)[0]] == ["CTVn_L1_L"]


def test_with_references_the_whole_contour_is_measured_not_flagged():
    """The whole contour's uncertain ratio depends on which structures the note calls for; a calibrated
    per-structure bundle leaves it to the structures, and says so in the notes."""
    blurred = _sphere_review(ramp_mm=80.0)
    assert [r for r in blurred.reasons if r.kind == "confidence"]
    review = _sphere_review(ramp_mm=80.0, config=ReviewConfig(left_out_reference={"CTVn_L1_L": 0.2}))
    assert not [r for r in review.reasons if r.kind == "confidence"]
    assert review.measures["uncertain_ratio"] == blurred.measures["uncertain_ratio"]
    assert any("judged per structure" in n for n in review.notes)


def test_left_out_references_and_factor_are_calibrated_on_right_contours():
    """References: each structure's median over its right structures (> min_confidence_cc) of right contours; too few
    cases of one side take the other side's; a floor keeps a reference of 0 from flagging single voxels. The factor
    starts at the default and rises (by 0.25) only while the whole review flags more than the budget of right
    contours; ``flagged_with`` and the bundle then judge with the references."""
    from MMContourLib.training.review_calibration import (MIN_REFERENCE, calibrate_jointly, flagged_with,
                                                          left_out_references, with_thresholds)

    def row(correct, ratios, kinds=()):
        return {"correct": correct, "kinds": list(kinds), "uncertain_ratio": 0.5, "drawn_cc": {n: 30.0 for n in ratios},
                "structure_confidence": {n: {"left_out_ratio": v, "uncertain_ratio": 0.5, "volume_cc": 30.0}
                                         for n, v in ratios.items()}}

    rows = [row(True, {"CTVn_L3_R": 0.1, "CTVp_Breast_R": 0.0}) for _ in range(7)]
    rows += [row(True, {"CTVn_L3_R": 0.33}) for _ in range(3)]
    rows += [row(True, {"CTVn_L3_L": 5.0}), row(True, {"CTVn_L3_L": 5.0})]  # 2 cases: not enough for its own
    rows += [row(False, {"CTVn_L3_R": 0.9}), row(False, {"CTVn_L3_R": 9.0}, kinds=["note"])]
    # a structure its note's guideline excludes (the note check flags it) is not one of the structure's cases
    excluded = {**row(True, {"CTVn_L3_R": 0.1, "CTVp_Breast_R": 0.0, "CTVn_L3_L": 7.0}), "expected": ["CTVn_L3_R", "CTVp_Breast_R"]}
    assert left_out_references(rows + [excluded])[0]["CTVn_L3_L"] == 0.1
    references, provenance = left_out_references(rows)
    assert references == {"CTVn_L3_R": 0.1, "CTVn_L3_L": 0.1, "CTVp_Breast_R": MIN_REFERENCE,
                          "CTVp_Breast_L": MIN_REFERENCE}
    assert provenance["CTVn_L3_L"] == {"cases": 2, "from": "CTVn_L3_R"} and provenance["CTVn_L3_R"]["cases"] == 10
    loose = calibrate_jointly(rows, 0.5)  # 12 right, 6 may be flagged: the default factor stands
    assert loose["max_left_out_factor"] == ReviewConfig().max_left_out_factor and loose["right_flagged"] == 5
    assert loose["left_out_reference"] == references and loose["right_flagged_without_threshold"] == 0
    tight = calibrate_jointly(rows, 0.1)  # 1 may be flagged: the 3 at 3.3 times must pass, the 2 at 50 cannot
    assert tight["max_left_out_factor"] == 20.0 and tight["right_flagged"] == 2
    mid = calibrate_jointly(rows[:10] + rows[12:], 0.1)
    assert mid["max_left_out_factor"] == 3.5 and mid["right_flagged"] == 0
    assert flagged_with(rows[:10] + rows[12:], mid) == {"right": 10, "right_flagged": 0, "wrong": 2, "wrong_flagged": 2}
    bundle = with_thresholds(type("B", (), {"inference": type("I", (), {"review": {}})()})(), mid, {"by": "test"})
    config = ReviewConfig.for_bundle(bundle.inference.review)
    assert config.max_left_out_factor == 3.5 and config.left_out_reference == references
    for broken in ({"left_out_reference": {"CTVn_L3_R": 0}}, {"left_out_reference": []}, {"max_left_out_factor": -2}):
        with pytest.raises(ValueError, match="left_out"):
            ReviewConfig.for_bundle(broken)


def test_flags_bench_measures_contours_and_structures(tmp_path):
    """bench/review_flags.py on a random per-structure bundle and two coarse phantoms: every structure row's
    verdict follows its Dice, its flag the reasons naming it, and the rates count them."""
    import importlib.util
    from pathlib import Path

    from MMContourLib.bench.fixtures import make_bundle as make_any_bundle
    from MMContourLib.data.phantom import PhantomConfig, generate_case
    from MMContourLib.note.structures import structure_classes

    path = Path(__file__).resolve().parents[1] / "bench" / "review_flags.py"
    spec = importlib.util.spec_from_file_location("review_flags", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bundle = make_any_bundle(tmp_path / "b", None, structures=structure_classes())
    contourer = Contourer.from_bundle(bundle, device="cpu")
    coarse = PhantomConfig(in_plane_spacing=6.0, slice_thickness=10.0)
    cases = [generate_case(s, coarse, case_id=f"c{s}") for s in (1, 2)]
    rows, structures = bench.run_set(contourer, cases, None, dice_threshold=0.5)
    assert len(rows) == 2 and structures
    for r in structures:
        assert r["correct"] == (r["dice"] >= 0.5)
        assert r["crumb"] == (r["truth_cc"] == 0 and r["drawn_cc"] <= ReviewConfig().max_excluded_cc)
    named = {(row["case_id"], line.split(":")[0]) for row in rows for line in row["reasons"]}
    assert {(r["case_id"], r["structure"]) for r in structures if r["kinds"]} <= named
    assert all(set(r["kinds_structure"]) <= set(r["kinds"]) for r in rows)
    scored = [r for r in structures if not r["crumb"]]
    rate = bench.rates(scored)
    assert rate["wrong"] + rate["right"] == len(scored)
    assert rate["wrong_flagged"] == sum(1 for r in scored if not r["correct"] and r["kinds"])
    if rate["wrong"]:
        assert rate["sensitivity"] == rate["wrong_flagged"] / rate["wrong"]
    assert bench.meets_target({"sensitivity": 0.9, "false_flag_rate": 0.2}) == "met"
    assert bench.meets_target({"sensitivity": 0.95, "false_flag_rate": 0.25}) == "not met"

    # a single-CTV bundle has no structure rows
    single = make_any_bundle(tmp_path / "single", None)
    assert bench.run_set(Contourer.from_bundle(single, device="cpu"), cases[:1], None)[1] == []


def test_flags_bench_calibrates_both_confidence_thresholds_within_one_budget_for_the_whole_review():
    """20 right contours: 2 flagged by the note check (no threshold), the rest by their uncertain ratios only.
    A 20 % budget allows 4: the joint thresholds leave 2 more flagged, where calibrating each flag alone at
    20 % flags up to 2 + 4 + 4."""
    import importlib.util
    from pathlib import Path

    from MMContourLib.training.review_calibration import calibrate_jointly

    path = Path(__file__).resolve().parents[1] / "bench" / "review_flags.py"
    spec = importlib.util.spec_from_file_location("review_flags", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for i in range(20):
        note = i < 2
        rows.append({"correct": True, "kinds": ["note"] if note else [], "uncertain_ratio": 0.1 * i,
                     "structure_confidence": {"CTVn_L1_L": {"uncertain_ratio": 0.05 * (19 - i), "volume_cc": 30.0}},
                     "drawn_cc": {"CTVn_L1_L": 30.0}})
    rows.append({"correct": False, "kinds": ["note"], "uncertain_ratio": 3.0, "structure_confidence": {},
                 "drawn_cc": {}})
    joint = calibrate_jointly(rows, 0.2)
    assert joint["right"] == 20 and joint["right_flagged_without_threshold"] == 2
    assert joint["right_flagged"] <= 4 and 0 < joint["share"] < 0.2
    t1, t2 = joint["max_uncertain_ratio"], joint["max_structure_uncertain_ratio"]
    flagged = sum(bool(r["kinds"]) or r["uncertain_ratio"] > t1
                  or r["structure_confidence"]["CTVn_L1_L"]["uncertain_ratio"] > t2 for r in rows[:20])
    assert flagged == joint["right_flagged"]
    # a smaller budget (room for the noise of 20 phantoms): the note flags alone spend 10 %, no confidence flag
    tight = calibrate_jointly(rows, 0.1)
    assert tight["right_flagged"] == 2 and tight["budget"] == 0.1 and tight["max_uncertain_ratio"] >= t1
    # each flag calibrated alone at 20 % (the old way): the review as a whole goes over the budget
    alone = bench.calibrate(rows[:20], 0.2)
    alone_structure = float(np.quantile([r["structure_confidence"]["CTVn_L1_L"]["uncertain_ratio"] for r in rows[:20]], 0.8))
    assert sum(bool(r["kinds"]) or r["uncertain_ratio"] > alone
               or r["structure_confidence"]["CTVn_L1_L"]["uncertain_ratio"] > alone_structure for r in rows[:20]) > 4
    # the checks without a threshold spend the whole budget: no right contour may add a confidence flag
    spent = [{**r, "kinds": ["note"] if i < 5 else []} for i, r in enumerate(rows[:20])]
    joint = calibrate_jointly(spent, 0.2)
    assert joint["share"] == 0 and joint["right_flagged"] == 5
    assert max(r["uncertain_ratio"] for r in spent) <= joint["max_uncertain_ratio"] < 1.91


def test_a_bundle_carries_its_own_calibrated_thresholds_and_the_contourer_flags_with_them(tmp_path):
    """Confidence thresholds depend on the model: ``bench/review_flags.py --calibrate K --save`` writes them
    into the bundle (``inference.review``), and the contourer reviews with them; other bundles keep the
    defaults, and a broken value is refused when the bundle is opened."""
    import importlib.util
    from pathlib import Path

    from MMContourLib.bench.fixtures import make_bundle as make_any_bundle
    from MMContourLib.data.phantom import PhantomConfig, generate_case
    from MMContourLib.model.bundle import ModelBundle
    from MMContourLib.note.structures import structure_classes

    path = Path(__file__).resolve().parents[1] / "bench" / "review_flags.py"
    spec = importlib.util.spec_from_file_location("review_flags", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bundle = make_any_bundle(tmp_path / "b", None, structures=structure_classes())
    case = generate_case(1, PhantomConfig(in_plane_spacing=6.0, slice_thickness=10.0), case_id="c1")
    default = Contourer.from_bundle(bundle, device="cpu")
    assert default.review_config == ReviewConfig()

    def confidence(contourer):
        return [r for r in contourer.contour(case.ct, case.note).review.reasons if r.kind == "confidence"]

    # a random network is unsure everywhere: a tiny threshold flags the contour and its structures ...
    config = bench.save_thresholds(bundle, {"share": 0.1, "max_uncertain_ratio": 1e-4, "max_structure_uncertain_ratio": 1e-4,
                                            "right": 20, "right_flagged": 4, "budget": 0.2}, seed=3, cases=20)
    assert config.max_uncertain_ratio == 1e-4 and config.max_structure_uncertain_ratio == 1e-4
    saved = ModelBundle.load(bundle).inference.review
    assert saved["max_uncertain_ratio"] == 1e-4 and saved["calibration"]["phantoms"].endswith("--seed 3 --planning-fov")
    flagged = confidence(Contourer.from_bundle(bundle, device="cpu"))
    assert any(r.structure is None for r in flagged) and any(r.structure for r in flagged)
    assert all("above 0:" in r.text for r in flagged)  # the bundle's threshold, in the clinician's line
    # ... a huge one flags nothing
    bench.save_thresholds(bundle, {"share": 0.0, "max_uncertain_ratio": 1e6, "max_structure_uncertain_ratio": 1e6,
                                   "right": 20, "right_flagged": 0, "budget": 0.2}, seed=3, cases=20)
    assert confidence(Contourer.from_bundle(bundle, device="cpu")) == []
    # a broken threshold is refused when the bundle is opened, not at the first contour
    broken = ModelBundle.load(bundle)
    broken.inference.review = {"max_uncertain_ratio": -1}
    broken.save(tmp_path / "broken")
    with pytest.raises(ValueError, match="max_uncertain_ratio"):
        Contourer.from_bundle(tmp_path / "broken", device="cpu")
    assert ReviewConfig.for_bundle({"calibration": {"share": 0.1}}) == ReviewConfig()


def test_fov_bench_adds_air_around_the_same_patient_and_picks_node_positive_notes():
    """bench/fov_robustness.py: the padded CT shows the same patient at the same place (only air around it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fov_robustness.py"
    spec = importlib.util.spec_from_file_location("fov_robustness", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (case,) = bench.node_positive_cases(1, seed=11)
    assert len(case.note.sides) == 1 and case.note.sides[0].node_positive
    assert case.ct.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    wide = bench.padded(case.ct, 20.0)
    voxels = int(round(20.0 / case.ct.GetSpacing()[0]))
    assert wide.GetSize() == (case.ct.GetSize()[0] + 2 * voxels, case.ct.GetSize()[1] + 2 * voxels, case.ct.GetSize()[2])
    back = sitk.Resample(wide, case.ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(case.ct))
    rim = sitk.GetArrayViewFromImage(wide)[:, :, :voxels]
    assert (rim == -1000).all()
    assert bench.padded(case.ct, 0) is case.ct


@pytest.mark.slow
def test_calibrate_review_sets_a_sites_thresholds_from_its_own_cases_in_a_new_bundle(tmp_path, one_thread):
    """``mmcontour calibrate-review``: the shipped bundle contours a site's cases (a manifest with regions maps),
    each is judged against its guideline regions, and the bundle is written to a new folder with the
    thresholds that keep the whole review within the budget on those cases; the input bundle and the weights
    are unchanged, and a contourer of the new bundle reviews with the new thresholds. A manifest without
    regions maps, or too few right contours, is refused with nothing written."""
    from dataclasses import replace

    from MMContourLib.cli.main import main
    from MMContourLib.data.manifest import read_cases
    from MMContourLib.data.phantom import PhantomConfig
    from MMContourLib.data.phantom_dataset import write_dataset
    from MMContourLib.model.bundle import ModelBundle
    from MMContourLib.model.bundle_info import default_bundle_path
    from MMContourLib.training.review_calibration import calibration_rows, flagged_with, write_calibrated

    shipped = default_bundle_path()
    shipped_config = (shipped / "config.json").read_bytes()
    manifest = write_dataset(4, tmp_path / "site", seed=5, config=replace(PhantomConfig.external_site(), planning_fov=True),
                             split_fractions=(0, 0, 1), progress=False)
    contourer = Contourer.from_bundle(shipped, device="cpu")
    rows = calibration_rows(contourer, read_cases(manifest, require_ctv=False))
    assert [r["case_id"] for r in rows] == [c.case_id for c in read_cases(manifest)]
    right = sum(r["correct"] for r in rows)
    assert right >= 2, rows  # the shipped bundle gets most phantoms right

    # too few right contours for the asked minimum: refused, nothing written
    with pytest.raises(ValueError, match="clinically right"):
        write_calibrated(ModelBundle.load(shipped), rows, tmp_path / "refused", 0.25, {"by": "test"}, min_right=right + 1)
    assert not (tmp_path / "refused").exists()

    report = write_calibrated(ModelBundle.load(shipped), rows, tmp_path / "site-bundle", 0.25, {"by": "test"}, min_right=2)
    allowed = int(0.25 * right)
    after = report["after"]
    assert after["right"] == right and (after["right_flagged"] <= allowed or report["joint"]["share"] == 0)
    keys = ("max_uncertain_ratio", "max_structure_uncertain_ratio", "max_left_out_factor", "left_out_reference")
    assert after == {**{k: report["joint"].get(k) for k in keys}, **flagged_with(rows, report["joint"])}
    assert report["before"]["left_out_reference"] == contourer.review_config.left_out_reference
    calibrated = ModelBundle.load(tmp_path / "site-bundle")
    assert calibrated.bundle_id == contourer.bundle.bundle_id == report["bundle_id"]  # weights unchanged
    review = calibrated.inference.review
    # the shipped bundle has per-structure outputs: the site's own left-out references and factor where its cases
    # have enough right structures, else the absolute ratios; the bundle carries exactly what was calibrated
    written = {k: review[k] for k in keys if k in review}
    assert written == {k: v for k, v in after.items() if k in keys and v is not None}
    assert review["calibration"]["by"] == "test" and review["calibration"]["cases"] == len(rows)
    again = Contourer.from_bundle(tmp_path / "site-bundle", device="cpu")
    assert all(getattr(again.review_config, k) == v for k, v in written.items())
    assert (shipped / "config.json").read_bytes() == shipped_config  # the input bundle is never touched

    # the command refuses a manifest whose cases have no regions map, before contouring, and writes nothing
    import csv

    with open(manifest, newline="") as f:
        table = list(csv.DictReader(f))
    with open(tmp_path / "site" / "bare.csv", "w", newline="") as f:  # beside the cases: same relative paths
        writer = csv.DictWriter(f, [k for k in table[0] if k != "regions"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    code = main(["calibrate-review", "--manifest", str(tmp_path / "site" / "bare.csv"), "--out", str(tmp_path / "x"), "--json"])
    assert code == 2 and not (tmp_path / "x").exists()
    # and an output that is the input bundle
    code = main(["calibrate-review", "--bundle", str(shipped), "--manifest", str(manifest), "--out", str(shipped),
                 "--overwrite", "--json"])
    assert code == 2 and (shipped / "config.json").read_bytes() == shipped_config
