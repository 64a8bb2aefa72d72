"""slicer.report: the review panel and the per-structure compare lines, from real ContourResult summaries
(hand-made label images, the real structure review), sent through the worker's JSON as the module gets them."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("torch")  # inference.contourer imports torch

from MMContourLib.inference.contourer import ContourResult  # noqa: E402
from MMContourLib.inference.review import Reason, Review, structure_reasons  # noqa: E402
from MMContourLib.note.clinical import ClinicalNote  # noqa: E402
from MMContourLib.note.structures import structure_classes  # noqa: E402
from MMContourLib.note.targets import structures_for_note  # noqa: E402
from MMContourLib.slicer import report  # noqa: E402
from MMContourLib.slicer.worker import _summary_of  # noqa: E402

SPACING = (2.0, 2.0, 2.5)  # 0.01 cc per voxel; one 30 x 30 slice = 9 cc


def _result(note_text: str, slices: dict[str, int], extra_reasons=()) -> ContourResult:
    """A ContourResult whose label image has ``slices[name]`` consecutive slices of each structure."""
    classes = structure_classes()
    labels = np.zeros((40, 30, 30), np.uint8)
    z = 0
    for name, count in slices.items():
        labels[z:z + count] = classes.index(name) + 1
        z += count
    label_image = sitk.GetImageFromArray(labels)
    label_image.SetSpacing(SPACING)
    mask = sitk.Cast(label_image > 0, sitk.sitkUInt8)
    mask.CopyInformation(label_image)
    note = ClinicalNote.parse(note_text)
    expected = tuple(structures_for_note(note))
    result = ContourResult(mask=mask, probability=sitk.Cast(mask, sitk.sitkFloat32), note=note,
                           prompt=note.to_prompt(), provenance={}, labels=label_image, classes=classes,
                           expected=expected)
    result.review = Review([*extra_reasons, *structure_reasons(result.structure_volumes(), expected, note, None)])
    return result


def test_review_panel_names_the_structure_first_and_gives_every_volume_in_cc():
    r = _result("N0, breast conserving surgery, left side", {"CTVp_Breast_L": 20, "CTVn_L1_L": 2},
                extra_reasons=[Reason("confidence", "62 % of the contour's voxels are uncertain")])
    summary = _summary_of(r)  # what the worker sends
    panel = report.review_panel(summary)
    assert panel.needs_review and panel.headline == "Needs review (2 reasons)"
    assert panel.reasons[0] == "62 % of the contour's voxels are uncertain"  # the whole contour: no name
    assert panel.reasons[1].startswith("CTVn_L1_L: 18 cc drawn, but the note's guideline for the left side")
    volumes = r.structure_volumes()
    assert panel.volumes == [f"CTV: {r.volume_cc:.1f} cc", f"CTVp_Breast_L: {volumes['CTVp_Breast_L']:.1f} cc",
                             f"CTVn_L1_L: {volumes['CTVn_L1_L']:.1f} cc (the note does not call for it)"]
    lines = panel.lines()
    assert lines[0] == panel.headline and "• CTVn_L1_L: 18 cc drawn" in "\n".join(lines)


def test_review_panel_without_flags_and_with_a_missing_structure():
    clean = report.review_panel(_summary_of(_result("N0, breast conserving surgery, left side", {"CTVp_Breast_L": 20})))
    assert clean.headline == report.NO_FLAGS and not clean.needs_review and not clean.reasons
    assert clean.volumes == ["CTV: 180.0 cc", "CTVp_Breast_L: 180.0 cc"]

    note = "N1, breast conserving surgery, left side"
    r = _result(note, {"CTVp_Breast_L": 20, "CTVn_L1_L": 3, "CTVn_L2_L": 2, "CTVn_L3_L": 1, "CTVn_L4_L": 1})
    missing = set(structures_for_note(ClinicalNote.parse(note))) - {n for n, cc in r.structure_volumes().items() if cc}
    assert missing  # the N1 guideline calls for a structure this result lacks
    panel = report.review_panel(_summary_of(r))
    assert panel.needs_review
    for name in missing:
        assert any(line.startswith(f"{name}: missing") for line in panel.reasons)
        assert f"{name}: 0.0 cc (called for by the note, not drawn)" in panel.volumes


def test_no_summary_says_so_instead_of_no_flags():
    panel = report.review_panel(None)
    assert not panel.needs_review and "no summary" in panel.headline


def test_compare_reports_structures_that_appear_disappear_and_volume_changes():
    n1 = _result("N1, breast conserving surgery, left side", {"CTVp_Breast_L": 20, "CTVn_L1_L": 3, "CTVn_L2_L": 2})
    n0 = _result("N0, breast conserving surgery, left side", {"CTVp_Breast_L": 18, "CTVn_IMN_L": 1})
    a, b = _summary_of(n1), _summary_of(n0)
    lines = report.compare_structures(a, b)
    va, vb = n1.structure_volumes(), n0.structure_volumes()
    assert lines[0] == f"CTV: {n1.volume_cc:.1f} cc → {n0.volume_cc:.1f} cc (−{n1.volume_cc - n0.volume_cc:.1f} cc)"
    assert f"CTVp_Breast_L: {va['CTVp_Breast_L']:.1f} cc → {vb['CTVp_Breast_L']:.1f} cc (−18.0 cc)" in lines
    assert f"CTVn_L1_L: disappears (was {va['CTVn_L1_L']:.1f} cc)" in lines
    assert f"CTVn_L2_L: disappears (was {va['CTVn_L2_L']:.1f} cc)" in lines
    assert f"CTVn_IMN_L: appears ({vb['CTVn_IMN_L']:.1f} cc)" in lines
    assert not any(line.startswith("CTVn_L3_L") or line.endswith("_R") for line in lines)  # neither drew them
    assert report.compare_structures(a, a)[1:] == [f"{n}: unchanged ({v:.1f} cc)" for n, v in va.items() if v]

    block = report.compare_lines([a, b])
    assert block[0] == f"'{n0.prompt}' compared with '{n1.prompt}':" and block[1:] == [f"  {x}" for x in lines]
    text, needs = report.result_text([{"prompt": n1.prompt, "summary": a}, {"prompt": n0.prompt, "summary": b}])
    assert needs and f"{n1.prompt}: Needs review" in text and "CTVn_IMN_L: appears" in text


def test_compare_with_a_single_ctv_bundle_says_per_structure_is_not_available():
    one = {"prompt": "N1, breast conserving surgery, left side", "volume_cc": 700.0, "structures": []}
    two = {"prompt": "N0, breast conserving surgery, left side", "volume_cc": 612.5, "structures": []}
    assert report.compare_structures(one, two) == [
        "CTV: 700.0 cc → 612.5 cc (−87.5 cc)",
        "per structure: not available (this bundle draws one CTV, no structures)"]


def test_status_texts_and_variants():
    assert report.progress_text("Contouring", "windows", 3, 12, 0, 2, 4.2) == \
        "Contouring: window 3/12 (note 1/2)… 4 s"
    assert report.outcome_text("CT CTV", 1.84, False, 7) == \
        "✓ CT CTV (7 segments): done in 1.8 s (model was already loaded)"
    question = report.replace_question("mine", ["CTV", "CTVn_L1_L", "Heart"])
    assert "3 segment(s): CTV, CTVn_L1_L, Heart" in question and "edits to them are lost" in question
    notes, text, ok = report.parse_variants(["N0, breast conserving surgery, left side", "", "N9 nonsense"])
    assert not ok and len(notes) == 1 and text.startswith("✗ variant 3:")
    notes, text, ok = report.parse_variants(["N0, breast conserving surgery, left side", "", ""])
    assert ok and text == "✓ 2 notes: the current one and 1 variant(s)"
