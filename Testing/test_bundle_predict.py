"""Bundles on disk and the Contourer, with a tiny real LLM folder and real MONAI sliding windows."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_ct

from MMContourLib.model.bundle import BundleError, ModelBundle
from MMContourLib.model.network import NetworkConfig, TextConditionedUNet, count_parameters
from MMContourLib.inference.contourer import Cancelled, Contourer
from MMContourLib.model.windows import count_windows
from MMContourLib.model.text import LLMMismatchError

NOTE = "N1, breast conserving surgery, left side"


@pytest.fixture(scope="module")
def contourer(tiny_bundle):
    return Contourer.from_bundle(tiny_bundle, device="cpu")


def test_paper_sized_network_parameter_counts():
    vision = count_parameters(TextConditionedUNet(NetworkConfig(feature_size=48)))
    multimodal = count_parameters(TextConditionedUNet(NetworkConfig(feature_size=48, text_dim=4096)))
    prompt_tuning = 2 * 8 * 4096 + 4096  # prompt vectors + [SEG] embedding
    assert abs(vision / 1e6 - 13.1) < 0.3  # paper Table S3: ~13.1 M
    assert abs((multimodal + prompt_tuning) / 1e6 - 21.5) < 1.0  # paper Table S3: ~21.5 M


def test_encoder_does_not_see_text_and_decoder_does():
    torch.manual_seed(0)
    net = TextConditionedUNet(NetworkConfig(feature_size=4, text_dim=16)).eval()
    x = torch.rand(1, 1, 32, 32, 16)
    g1, g2 = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    feats = net.encode(x)
    with torch.no_grad():
        a, b = net.decode(feats, g1), net.decode(feats, g2)
    assert a.shape == (1, 2, 32, 32, 16) and not torch.allclose(a, b)
    torch.testing.assert_close(net(x, g1), a)


def test_mask_on_ct_grid_and_one_llm_call_per_contour(contourer):
    ct = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0))
    calls = contourer.llm_calls
    stages = []
    result = contourer.contour(ct, NOTE, progress=lambda s, d, t: stages.append((s, d, t)))
    assert result.windows > 1, "the test CT must need several windows"
    assert contourer.llm_calls == calls + 1
    assert result.mask.GetSize() == ct.GetSize() and result.mask.GetDirection() == ct.GetDirection()
    assert result.mask.GetOrigin() == ct.GetOrigin() and result.mask.GetSpacing() == ct.GetSpacing()
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    windows = [s for s in stages if s[0] == "windows"]
    assert windows[-1] == ("windows", result.windows, result.windows)
    assert result.provenance["llm_fingerprint"].startswith("sha256:") and result.prompt == NOTE
    contourer.contour(ct, NOTE)  # same note again: served from the embedding cache
    assert contourer.llm_calls == calls + 1


def test_window_count_matches_monai(contourer):
    ct = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0))
    x = contourer.prepare(ct)
    expected = count_windows(x.array.shape, contourer.roi_size, contourer.overlap)
    assert contourer.contour(ct, NOTE).windows == expected


def test_note_changes_the_output(contourer):
    ct = make_ct(size=(48, 40, 24))
    a = contourer.contour(ct, NOTE).probability
    b = contourer.contour(ct, "N0, total mastectomy surgery, right side").probability
    assert np.abs(sitk.GetArrayFromImage(a) - sitk.GetArrayFromImage(b)).max() > 1e-4


def test_bundle_save_load_gives_identical_outputs(tiny_bundle, contourer, tmp_path):
    ct = make_ct(size=(48, 40, 24))
    copy = ModelBundle.load(tiny_bundle).save(tmp_path / "copy")
    other = Contourer.from_bundle(copy, device="cpu")
    a = sitk.GetArrayFromImage(contourer.contour(ct, NOTE).probability)
    b = sitk.GetArrayFromImage(other.contour(ct, NOTE).probability)
    assert np.array_equal(a, b)
    config = json.loads((copy / "config.json").read_text())
    assert config["text_encoder"]["fingerprint"] == contourer.text.fingerprint
    assert config["prompt_template_version"] == contourer.text.template == "table5-v2"
    assert all(k.startswith(("net.", "text.")) for k in ModelBundle.load(copy).weights)
    assert not any("embed_tokens" in k or "layers." in k for k in ModelBundle.load(copy).weights), \
        "the LLM's weights must never be copied into a bundle"


def test_a_bundle_saved_with_new_settings_keeps_its_weights_file_byte_for_byte(tiny_bundle, tmp_path):
    """Recalibrating a shipped bundle's review rewrites config.json only: the weights file (here written by an
    older MMContour, whose metadata a fresh write would change) keeps its bytes and checksum. Changed weights
    are written anew."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    weights = old / "weights.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "mmcontour": "0.0-older"})
    config = json.loads((old / "config.json").read_text())
    config["files"]["weights.safetensors"] = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                              "bytes": weights.stat().st_size}
    (old / "config.json").write_text(json.dumps(config))
    bundle = ModelBundle.load(old)
    bundle.inference.review = {**bundle.inference.review, "max_left_out_factor": 2.5}
    kept = bundle.save(tmp_path / "recalibrated")
    assert (kept / "weights.safetensors").read_bytes() == weights.read_bytes()
    assert ModelBundle.load(kept).inference.review["max_left_out_factor"] == 2.5
    assert ModelBundle.load(bundle.save(old)).path == old  # saved over itself: still reads back
    assert (old / "weights.safetensors").read_bytes() == (kept / "weights.safetensors").read_bytes()
    changed = ModelBundle.load(kept)
    name = next(iter(changed.weights))
    changed.weights[name] = changed.weights[name] + 1
    rewritten = changed.save(tmp_path / "changed")
    assert (rewritten / "weights.safetensors").read_bytes() != weights.read_bytes()
    assert torch.equal(ModelBundle.load(rewritten).weights[name], changed.weights[name])


def test_a_table5_v1_bundle_is_read_as_it_was_trained(tiny_bundle, tmp_path):
    """Bundles up to v10 read a bilateral note in one pass (N tokens); they keep doing so."""
    old = ModelBundle.load(tiny_bundle)
    old.prompt_template_version = "table5-v1"
    old = Contourer.from_bundle(old.save(tmp_path / "v1"), device="cpu")
    new = Contourer.from_bundle(tiny_bundle, device="cpu")
    bilateral = "N0, breast conserving surgery, left side; N2, total mastectomy surgery, right side"
    assert old.text.template == "table5-v1" and old.encode_notes([bilateral]).shape[1] == 2
    assert new.encode_notes([bilateral]).shape[1] == 4
    torch.testing.assert_close(old.encode_notes([NOTE]), new.encode_notes([NOTE]))  # unilateral: the same reading
    result = old.contour(make_ct(size=(48, 40, 24)), bilateral)
    assert result.provenance["prompt_template_version"] == "table5-v1"


def test_mismatched_llm_is_refused(tiny_bundle, other_llm_dir):
    with pytest.raises(LLMMismatchError):
        Contourer.from_bundle(tiny_bundle, llm=str(other_llm_dir), device="cpu")


def test_damaged_bundles_are_refused(tiny_bundle, tmp_path):
    def fresh(name):
        target = tmp_path / name
        shutil.copytree(tiny_bundle, target)
        return target

    b = fresh("missing")
    (b / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        ModelBundle.load(b)
    b = fresh("truncated")
    data = (b / "weights.safetensors").read_bytes()
    (b / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        ModelBundle.load(b)
    b = fresh("tampered")
    data = bytearray((b / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (b / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        ModelBundle.load(b)
    b = fresh("badjson")
    (b / "config.json").write_text("{")
    with pytest.raises(BundleError, match="JSON"):
        ModelBundle.load(b)
    b = fresh("template")
    cfg = json.loads((b / "config.json").read_text())
    cfg["prompt_template_version"] = "future-v9"
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="prompt template"):
        ModelBundle.load(b)
    with pytest.raises(BundleError, match="not found"):
        ModelBundle.load(tmp_path / "nowhere")


def test_cancel_stops_before_anything_is_returned(contourer):
    ct = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0))
    seen = []

    def cancel():
        return len(seen) >= 1

    with pytest.raises(Cancelled):
        contourer.contour(ct, NOTE, progress=lambda s, d, t: seen.append(d) if s == "windows" else None,
                          cancel=cancel)


def test_vision_only_bundle_ignores_note(tiny_vision_bundle):
    c = Contourer.from_bundle(tiny_vision_bundle, device="cpu")
    ct = make_ct(size=(48, 40, 24))
    a = sitk.GetArrayFromImage(c.contour(ct, NOTE).probability)
    b = sitk.GetArrayFromImage(c.contour(ct, "N0, total mastectomy surgery, right side").probability)
    assert np.array_equal(a, b) and c.llm_calls == 0


# -- undoing the training's loss weights (inference.loss_weight_correction) --------------------------------

def test_undo_loss_weights_is_bayes_rule_run_backwards():
    """A network trained with a structure's voxels weighed w times answers w q / (w q + 1 - q) where the voxel is
    inside with probability q; dividing by w and renormalising against the background gives q back, leaves the
    other structures' odds against each other alone, and changes nothing where the network is sure."""
    from MMContourLib.inference.contourer import undo_loss_weights

    classes = ("CTVp_Breast_L", "CTVn_L4_L")
    q = np.array([0.0, 0.1, 1 / 7, 0.3, 0.5, 0.9, 1.0], np.float32)
    w = 6.0
    p = w * q / (w * q + 1 - q)  # what the weighted loss teaches: a voxel inside one time in seven is on the edge (p = 0.5)
    prob = np.stack([np.zeros_like(p), p])
    back = undo_loss_weights(prob, classes, {"CTVn_L4_L": w})
    assert np.allclose(back[1], q, atol=1e-6) and np.allclose(back[0], 0)
    assert abs(p[2] - 0.5) < 1e-6 and back[1][2] < 0.5 < p[3]  # on the edge of being drawn before, far from it after
    # two structures and background: the unweighted one keeps its odds against the weighted one's undone share
    prob = np.array([[0.3], [0.6]], np.float32)  # background 0.1
    back = undo_loss_weights(prob, classes, {"CTVn_L4_L": 6.0})
    assert np.allclose(back[:, 0], np.array([0.3, 0.1]) / 0.5)
    assert undo_loss_weights(prob, classes, {}) is prob  # no correction: the same array


def test_a_bundles_loss_weight_correction_shrinks_only_its_structures_and_is_recorded(tiny_structure_bundle, tmp_path):
    """The contourer applies the bundle's ``inference.loss_weight_correction`` to the network's probabilities:
    the structures named get smaller or stay, the contour equals ``from_probabilities`` on the same
    probabilities, the provenance names the correction, and a name the bundle does not draw or a weight below 1
    is refused when the bundle is opened."""
    from MMContourLib.inference.contourer import check_loss_weights
    from MMContourLib.note.clinical import ClinicalNote

    ct = make_ct()
    plain = Contourer.from_bundle(tiny_structure_bundle, device="cpu")
    classes = plain.network.config.structures
    nodal = [c for c in classes if c.startswith("CTVn")]
    bundle = ModelBundle.load(tiny_structure_bundle)
    bundle.inference.loss_weight_correction = {name: 1e6 for name in nodal}
    bundle.save(tmp_path / "corrected")
    assert ModelBundle.load(tmp_path / "corrected").inference.loss_weight_correction == {n: 1e6 for n in nodal}
    corrected = Contourer.from_bundle(tmp_path / "corrected", device="cpu")
    assert corrected.loss_weights == {n: 1e6 for n in nodal} and plain.loss_weights == {}

    model_input = plain.prepare(ct)
    prob, _ = plain.probabilities(model_input, plain.encode_notes([NOTE]))
    before = plain.from_probabilities(ct, model_input, ClinicalNote.parse(NOTE), prob)
    again = plain.contour(ct, NOTE)
    assert np.array_equal(sitk.GetArrayViewFromImage(before.mask), sitk.GetArrayViewFromImage(again.mask))
    after = corrected.contour(ct, NOTE)
    v0, v1 = before.structure_volumes(), after.structure_volumes()
    assert sum(v0[n] for n in nodal) > 0, v0  # the random network draws some nodal voxels to take away
    assert sum(v1[n] for n in nodal) < sum(v0[n] for n in nodal) and all(v1[n] <= v0[n] + 1e-9 for n in nodal)
    assert "CTVn_L1_L /1e+06" in after.provenance["loss_weight_correction"]
    assert plain.contour(ct, NOTE).provenance["loss_weight_correction"] == ""

    with pytest.raises(ValueError, match="not one of the bundle's structures"):
        check_loss_weights({"CTVn_L9_L": 2.0}, classes)
    with pytest.raises(ValueError, match=">= 1"):
        check_loss_weights({"CTVn_L1_L": 0.5}, classes)
    bundle.inference.loss_weight_correction = {"CTVn_L1_L": True}
    bundle.save(tmp_path / "broken")
    with pytest.raises(ValueError, match="must be a number"):
        Contourer.from_bundle(tmp_path / "broken", device="cpu")


def test_the_correction_bench_picks_the_best_nodal_dice_that_loses_no_right_contour(tiny_structure_bundle, tmp_path):
    """bench/loss_weight_correction.py: the nodal structures are the levels and internal mammary nodes; the
    factor chosen has the best nodal-structure Dice among those that make no contour wrong that factor 1 got
    right; --save writes it for every nodal structure with how it was chosen, and the contourer applies it."""
    import importlib.util
    from pathlib import Path

    from MMContourLib.note.structures import structure_classes

    path = Path(__file__).resolve().parents[1] / "bench" / "loss_weight_correction.py"
    spec = importlib.util.spec_from_file_location("loss_weight_correction", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    nodal = bench.nodal_structures(structure_classes())
    assert nodal == [c for c in structure_classes() if c.startswith("CTVn")] and len(nodal) == 10

    def row(case, correct, dice, ctv=0.9):
        return {"case_id": case, "correct": correct, "dice": ctv, "structure_dice": dice,
                "nodal_dice": {"CTVn_L4_L": dice}}

    rows = {(1.0, 0.5): [row("a", True, 0.4), row("b", True, 0.5), row("c", False, 0.2)],
            (3.0, 0.5): [row("a", True, 0.6), row("b", True, 0.6), row("c", True, 0.5)],
            (6.0, 0.5): [row("a", False, 0.9), row("b", True, 0.9), row("c", True, 0.9)]}
    summary = bench.summarise(rows)
    assert summary[6.0, 0.5]["lost"] == ["a"] and summary[3.0, 0.5]["lost"] == [] and summary[1.0, 0.5]["correct"] == 2
    assert abs(summary[3.0, 0.5]["nodal_dice"] - 0.5667) < 1e-3
    assert bench.choose(summary) == (3.0, 0.5)  # 6 has the best Dice but makes case a wrong
    rows[6.0, 0.5][0]["correct"] = True
    assert bench.choose(bench.summarise(rows)) == (6.0, 0.5)
    # thresholds: the first pair (no correction, the bundle's threshold) is the reference a pair may not lose
    # contours against; --choose-by ctv decides by the whole CTV's Dice
    rows = {(1.0, 0.5): [row("a", True, 0.5, 0.80), row("b", True, 0.5, 0.82)],
            (1.0, 0.6): [row("a", True, 0.5, 0.85), row("b", True, 0.5, 0.86)],
            (1.0, 0.7): [row("a", True, 0.5, 0.90), row("b", False, 0.5, 0.90)]}
    summary = bench.summarise(rows)
    assert summary[1.0, 0.7]["lost"] == ["b"]
    assert bench.choose(summary, "ctv") == (1.0, 0.6)
    assert bench.choose(summary, "nodal") == (1.0, 0.5)  # equal nodal Dice: the threshold nearest the bundle's

    bundle = tmp_path / "b"
    shutil.copytree(tiny_structure_bundle, bundle)
    bench.save(bundle, 3.0, nodal, {"by": "test", "chosen": 3.0}, version="7")
    saved = ModelBundle.load(bundle)
    assert saved.inference.loss_weight_correction == {n: 3.0 for n in nodal} and saved.version == "7"
    assert saved.training["loss_weight_correction"]["chosen"] == 3.0
    assert Contourer.from_bundle(bundle, device="cpu").loss_weights == {n: 3.0 for n in nodal}
    bench.save(bundle, 1.0, nodal, {"by": "test", "chosen": 1.0}, threshold=0.6)  # factor 1: no correction
    assert ModelBundle.load(bundle).inference.loss_weight_correction == {}
    assert ModelBundle.load(bundle).inference.threshold == 0.6
