"""Bundles on disk and the Contourer, with a tiny real LLM folder and real MONAI sliding windows."""
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
