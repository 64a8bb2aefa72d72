"""``mmcontour bench`` and the performance features it measures (fused alignment, feature cache,
LLM offload, out-of-memory fallback), on the tiny model."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_ct

from MMContourLib.cli import main as cli
from MMContourLib.model.network import NetworkConfig, TextConditionedUNet, fused_alignment
from MMContourLib.inference.contourer import Contourer

NOTE = "N1, breast conserving surgery, left side"
EDITED = "N0, total mastectomy surgery, right side"


@pytest.fixture(scope="module")
def report(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    work = out.parent / "work"
    assert cli.main(["bench", "--preset", "tiny", "--llm", str(tiny_llm_dir), "--work", str(work), "--repeats", "2",
                     "--out", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_bench_reports_what_issue_2_asks(report):
    s = report["summary"]
    params = report["parameters"]
    assert params["feature_size"] == 48 and params["text_dim"] == 4096
    assert abs(params["vision_only_millions"] - 13.1) < 0.3  # paper Table S3
    assert abs(params["multimodal_trainable_millions"] - 21.5) < 1.0
    assert s["windows"] > 1 and s["llm_calls_per_contour"] == 1  # once per note, not per window
    assert 0.2 < s["window_ratio_multimodal_over_vision"] < 20
    assert report["measured"]["reference"]["llm_calls"] == s["windows"]  # the reference: once per window
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "transformers" in env


def test_bench_reports_what_issue_5_asks(report):
    s = report["summary"]
    for key in ("model_load_s", "encode_note_s", "time_per_window_s", "end_to_end_s", "edited_note_s",
                "peak_host_mib", "train_per_input_s", "train_peak_host_mib", "reference_windows_s"):
        assert isinstance(s[key], (int, float)) and s[key] > 0, key
    contour = report["measured"]["contour"]
    assert all(run["edited_feature_cache"] == "hit" for run in contour["runs"])
    assert report["measured"]["training"]["trainable_parameters"] > 0
    assert report["preset"]["name"] == "tiny" and report["llm"]["random_weights"] is False


def test_fused_alignment_is_the_same_function():
    torch.manual_seed(0)
    net = TextConditionedUNet(NetworkConfig(feature_size=8, text_dim=24)).eval()
    x, g = torch.rand(2, 1, 32, 32, 16), torch.randn(2, 2, 24)
    with torch.no_grad():
        feats = net.encode(x)
        for tokens in (g, torch.randn(2, 3, 24)):  # the paper's N = 2 (sigmoid form) and any other N
            for align, f in zip(net.align, feats):
                torch.testing.assert_close(fused_alignment(align, f, tokens), align(f, tokens), atol=1e-5, rtol=1e-4)
                f = f.contiguous(memory_format=torch.channels_last_3d)
                torch.testing.assert_close(fused_alignment(align, f, tokens), align(f, tokens), atol=1e-5, rtol=1e-4)
        fused = net(x, g)
        plain = TextConditionedUNet(net.config, fused_alignment=False).eval()
        plain.load_state_dict(net.state_dict())
        torch.testing.assert_close(fused, plain(x, g), atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x, g = torch.rand(1, 1, 32, 32, 16), torch.randn(1, 2, 8)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # the same weights in both
        net = TextConditionedUNet(NetworkConfig(feature_size=4, text_dim=8), activation_checkpointing=ckpt)
        net.eval()  # eval: no running statistics move
        net(x, g).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_edited_note_reuses_features_and_equals_a_fresh_contour(tiny_bundle):
    ct = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0))
    cached = Contourer.from_bundle(tiny_bundle, device="cpu", cache_features="auto")
    first = cached.contour(ct, NOTE)
    assert first.feature_cache == "device" and first.windows > 1
    edited = cached.contour(ct, EDITED)
    assert edited.feature_cache == "hit"
    fresh = Contourer.from_bundle(tiny_bundle, device="cpu", cache_features="off").contour(ct, EDITED)
    assert fresh.feature_cache == "off"
    assert np.array_equal(sitk.GetArrayFromImage(edited.probability), sitk.GetArrayFromImage(fresh.probability))
    assert np.array_equal(sitk.GetArrayFromImage(edited.mask), sitk.GetArrayFromImage(fresh.mask))
    other = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0), seed=3)
    assert cached.contour(other, EDITED).feature_cache == "device"  # a new CT is never served old features


def test_feature_cache_respects_its_memory_cap(tiny_bundle):
    ct = make_ct(size=(48, 40, 24))
    c = Contourer.from_bundle(tiny_bundle, device="cpu", feature_cache_bytes=1000)
    assert c.contour(ct, NOTE).feature_cache == "off"
    assert c.contour(ct, EDITED).feature_cache == "off"


class RunsOutOfMemoryForBatches(torch.nn.Module):
    """A network stand-in (injected) that fails like a full GPU when given more than one window."""

    def __init__(self, network):
        super().__init__()
        self.network, self.failures = network, 0
        self.align, self.downsample_factor = network.align, network.downsample_factor

    def encode(self, x):
        if x.shape[0] > 1:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.network.encode(x)

    def decode(self, feats, g):
        return self.network.decode(feats, g)


def test_out_of_memory_halves_the_window_batch_with_a_warning(tiny_bundle):
    ct = make_ct(size=(64, 56, 30), spacing=(4.0, 4.0, 6.0))
    reference = Contourer.from_bundle(tiny_bundle, device="cpu", sw_batch_size=1).contour(ct, NOTE)
    c = Contourer.from_bundle(tiny_bundle, device="cpu", sw_batch_size=4)
    flaky = RunsOutOfMemoryForBatches(c.network)
    c._encode, c._decode = flaky.encode, flaky.decode
    with pytest.warns(RuntimeWarning, match="out of GPU memory with 4 windows per batch; retrying with 2"):
        result = c.contour(ct, NOTE)
    assert c.sw_batch_size == 1 and flaky.failures == 2 and len(c.fallbacks) == 2
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.probability),
                               sitk.GetArrayFromImage(reference.probability), atol=1e-5)


def test_offload_on_the_cpu_releases_the_llm_and_reloads_it_for_a_new_note(tiny_bundle):
    """CPU memory mode: the LLM is freed after encoding (the U-Net runs without it), a cached note does not
    bring it back, a new note reloads it (fingerprint checked again); contours are those without offload."""
    ct = make_ct(size=(48, 40, 24))
    plain = Contourer.from_bundle(tiny_bundle, device="cpu")
    c = Contourer.from_bundle(tiny_bundle, device="cpu", offload_llm=True)
    assert c.text.llm_loaded  # released only after the first note, not loaded twice at start
    first = c.contour(ct, NOTE)
    assert c.llm_calls == 1 and not c.text.llm_loaded and c.text.llm_device() is None
    with pytest.raises(RuntimeError, match="released"):
        c.text.llm
    again = c.contour(ct, NOTE)  # cached embedding: no reload, no LLM call
    assert c.llm_calls == 1 and not c.text.llm_loaded
    other = c.contour(ct, "N0, breast conserving surgery, right side")
    assert c.llm_calls == 2 and not c.text.llm_loaded
    for result, note in ((first, NOTE), (again, NOTE), (other, "N0, breast conserving surgery, right side")):
        np.testing.assert_allclose(sitk.GetArrayFromImage(result.probability),
                                   sitk.GetArrayFromImage(plain.contour(ct, note).probability), atol=1e-6)
    c.text.move_llm("cpu")  # explicit reload
    assert c.text.llm_loaded and c.text.llm_device().type == "cpu"


@pytest.mark.slow
def test_scaleout_runs_under_torchrun(tiny_llm_dir, tmp_path):
    from MMContourLib.bench.presets import PRESETS
    from MMContourLib.bench.scaleout import bench_scaleout

    result = bench_scaleout(PRESETS["tiny"](), tiny_llm_dir, 2, 1, lambda m: None, timeout_s=300)
    assert "error" not in result, result.get("error")
    assert result["n_processes"]["world_size"] == 2 and result["throughput_ratio"] > 0
    assert result["gradient_mib_per_step"] > 0
