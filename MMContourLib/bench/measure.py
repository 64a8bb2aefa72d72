"""``mmcontour bench``: speed and memory of contouring (and training) at a chosen scale.

Presets (``--preset``):

* ``tiny``: test-sized (random 2-layer Llama, feature size 4); seconds; what the tests run.
* ``small``: demo-sized (a SmolLM2-135M-*shaped* random LLM, feature size 16, 2 x 2 x 6 mm).
* ``cpu``: production-sized on the CPU: a Llama-2-7B-*shaped* random LLM in bf16 and the
  feature-size-48 U-Net, with a CPU window chosen to stay within 16 GB of host memory.
* ``gpu-7b``: production-sized on one GPU: 7B-shaped LLM in bf16, 384 x 384 x 128 windows.

The LLM has random weights written as a real Hugging Face folder (``randomllm.py``), loaded by the
same code as Llama-2-7B-chat: speed and memory do not depend on the weights' values. The CT is a
synthetic thorax of 512 x 512 x 120 at 0.98 x 0.98 x 2.5 mm (the tiny preset: a small one).

It reports model load, note encoding, windows and time per window, end to end, the edited-note
time, peak memory (GPU and host), LLM calls per contour, parameter counts, the per-window cost of
the alignment (multimodal / vision-only), the reference-style loop (LLM once per window, fp32,
no caching) on the same CT, training time per input and its peak memory, and (``--scaleout N``)
training throughput of N CPU processes under torchrun (gloo) against one.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .fixtures import make_bundle, random_llm_folder, synthetic_ct
from .presets import NOTES, Preset, med

# -- measuring ------------------------------------------------------------------------------------

class HostPeak:
    """Peak resident memory of this process while the block runs (sampled every few ms)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


class Measure:
    """Wall time, host peak and (on CUDA) peak allocated GPU memory of a block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.host = HostPeak().__enter__()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t
        self.host.__exit__(*exc)
        self.gpu_mib = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.cuda else None
        self.host_mib = self.host.mib


def environment(device) -> dict:
    import monai
    import numpy
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "monai": monai.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": str(device)}
    try:
        import psutil

        info["host_memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except (ImportError, OSError):
        pass
    info["source"] = _source_revision()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        import bitsandbytes  # noqa: F401

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def _source_revision() -> str:
    """The git commit the package runs from (+ "-dirty" with local changes), when it is a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "MMContourLib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("-dirty" if rev and dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# -- the measurements ---------------------------------------------------------------------------

def parameter_counts(text_dim: int = 4096, feature_size: int = 48) -> dict:
    from ..model.network import NetworkConfig, TextConditionedUNet, count_parameters

    vision = count_parameters(TextConditionedUNet(NetworkConfig(feature_size=feature_size)))
    multimodal = count_parameters(TextConditionedUNet(NetworkConfig(feature_size=feature_size, text_dim=text_dim)))
    prompt = 2 * 8 * text_dim + text_dim  # N x M prompt vectors + the [SEG] embedding
    return {"feature_size": feature_size, "text_dim": text_dim, "vision_only": vision,
            "multimodal_network": multimodal, "prompt_tuning": prompt,
            "multimodal_trainable": multimodal + prompt,
            "vision_only_millions": round(vision / 1e6, 2),
            "multimodal_trainable_millions": round((multimodal + prompt) / 1e6, 2)}


def _fresh_ct(contourer) -> None:
    """Forget the prepared CT and its features, so the next contour starts from scratch."""
    contourer._last_input = None
    contourer.clear_feature_cache()


def bench_contour(contourer, ct, notes, repeats: int, say, edited_note: bool = True) -> dict:
    """End to end (new CT, new note) and edited note (same CT, new note), ``repeats`` times each."""
    import torch

    end_to_end, edited, per_window, runs = [], [], [], []
    with Measure(contourer.device) as w:
        warm_up(contourer)
    say(f"warm-up (one window{', compiling' if contourer._encode != contourer.network.encode else ''}): "
        f"{w.seconds:.1f} s")
    for r in range(repeats):
        _fresh_ct(contourer)
        calls = contourer.llm_calls
        with Measure(contourer.device) as m:
            result = contourer.contour(ct, notes[(2 * r) % len(notes)])
        first_calls = contourer.llm_calls - calls
        with Measure(contourer.device) as e:
            edit = contourer.contour(ct, notes[(2 * r + 1) % len(notes)]) if edited_note else result
        run = {"end_to_end_s": round(m.seconds, 4), "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
               "windows": result.windows, "llm_calls": first_calls, "peak_gpu_mib": m.gpu_mib,
               "peak_host_mib": m.host_mib, "edited_note_s": round(e.seconds, 4) if edited_note else None,
               "edited_timings_s": {k: round(v, 4) for k, v in edit.timings.items()},
               "edited_peak_gpu_mib": e.gpu_mib, "feature_cache": result.feature_cache,
               "edited_feature_cache": edit.feature_cache}
        runs.append(run)
        end_to_end.append(m.seconds)
        edited.append(e.seconds if edited_note else None)
        per_window.append(result.timings["windows"] / max(1, result.windows))
        say(f"contour {r + 1}/{repeats}: {m.seconds:.2f} s end to end ({result.windows} windows)"
            + (f", edited note {e.seconds:.2f} s [{edit.feature_cache or 'n/a'}]" if edited_note else ""))
        if contourer.device.type == "cuda":
            torch.cuda.empty_cache()
    last = runs[-1]
    return {"end_to_end_s": med(end_to_end), "edited_note_s": med(edited), "time_per_window_s": med(per_window),
            "warm_up_s": round(w.seconds, 3),
            "windows": last["windows"], "llm_calls_per_contour": max(r["llm_calls"] for r in runs),
            "windows_s": med(r["timings_s"]["windows"] for r in runs),
            "encode_note_s": med(r["timings_s"]["encode_note"] for r in runs),
            "preprocess_s": med(r["timings_s"]["preprocess"] for r in runs),
            "postprocess_s": med(r["timings_s"]["postprocess"] for r in runs),
            "peak_gpu_mib": max((r["peak_gpu_mib"] or 0 for r in runs), default=None) if contourer.device.type == "cuda" else None,
            "peak_host_mib": max(r["peak_host_mib"] for r in runs), "runs": runs}


def warm_up(contourer) -> None:
    """One window through encoder and decoder: kernel selection (and compilation) happen here, not
    in the first timed contour."""
    import torch

    from ..model.device import autocast_context

    x = torch.rand(contourer.sw_batch_size, 1, *contourer.roi_size, device=contourer.device)
    if contourer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    g = contourer.encode_notes([NOTES[-1]])
    g = None if g is None else g.to(contourer.device)
    with torch.inference_mode(), autocast_context(contourer.device, contourer.precision):
        contourer._decode(contourer._encode(x), g)


def bench_note_encoding(contourer, notes, repeats: int) -> dict:
    """Time of one LLM forward for a note not seen before (both prompt sets, dynamic padding)."""
    times = []
    for r in range(repeats):
        note = notes[(r * 7 + 3) % len(notes)]
        contourer.text.clear_cache()
        with Measure(contourer.device) as m:
            contourer.encode_notes([note])
        times.append(m.seconds)
    return {"encode_note_s": med(times), "runs_s": [round(t, 4) for t in times]}


def bench_window_ratio(preset: Preset, device, text_dim: int, repeats: int) -> dict:
    """Forward time of one window: vision-only vs multimodal network of the same size (same settings)."""
    import torch

    from ..model.device import autocast_context
    from ..model.network import NetworkConfig, TextConditionedUNet

    nets = {}
    for name, dim in (("vision_only", None), ("multimodal", text_dim)):
        torch.manual_seed(0)
        net = TextConditionedUNet(NetworkConfig(feature_size=preset.feature_size, text_dim=dim)).to(device).eval()
        if preset.channels_last:
            net.to(memory_format=torch.channels_last_3d)
        nets[name] = net
    x = torch.rand(preset.sw_batch_size, 1, *preset.roi, device=device)
    if preset.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(preset.sw_batch_size, 2, text_dim, device=device)
    autocast = autocast_context(device, preset.precision)
    times = {name: [] for name in nets}
    with torch.inference_mode(), autocast:
        for name, net in nets.items():  # warm-up (kernel selection)
            net(x, g if net.align is not None else None)
        for _ in range(repeats):  # interleaved, so a busy machine slows both alike
            for name, net in nets.items():
                with Measure(device) as m:
                    net(x, g if net.align is not None else None)
                times[name].append(m.seconds)
    v, mm = med(times["vision_only"]), med(times["multimodal"])
    pairs = [round(b / a, 3) for a, b in zip(times["vision_only"], times["multimodal"])]
    return {"roi": list(preset.roi), "vision_only_s": v, "multimodal_s": mm, "ratio": round(mm / v, 3),
            "ratio_per_pair": pairs}


def bench_reference(contourer, ct, note: str, preset: Preset, work_llm: Path, say) -> dict:
    """The reference code's way: the LLM (fp32) runs again for every sliding window, the U-Net in fp32
    with the plain attention, nothing cached. Same CT, same window size and overlap."""
    import torch

    from ..model.network import TextConditionedUNet
    from ..model.text import TextEncoderSpec, build_text_encoder
    from ..model.windows import SlidingWindow

    need = _fp32_llm_bytes(preset.llm_shape)
    if not _fits(need, contourer.device):
        return {"skipped": f"the fp32 LLM needs ~{need / 2**30:.1f} GiB, more than this machine has free"}
    spec = TextEncoderSpec.from_dict({**contourer.text.spec.to_dict(), "source": str(work_llm)})
    with Measure(contourer.device) as load:
        text = build_text_encoder(spec, device=contourer.device, dtype="fp32", template=contourer.text.template)
        text.load_trainable_state_dict(contourer.text.trainable_state_dict())
    net = TextConditionedUNet(contourer.network.config, fused_alignment=False)
    net.load_state_dict(contourer.network.state_dict())
    net.to(contourer.device).eval()
    model_input = contourer.prepare(ct)
    x = torch.from_numpy(model_input.array)[None, None].to(contourer.device)
    window = SlidingWindow(contourer.roi_size, contourer.overlap, sw_batch_size=1, precision="fp32")
    total = window.windows(x.shape[2:])
    llm_calls = 0

    def note_per_window() -> torch.Tensor:
        nonlocal llm_calls
        llm_calls += 1
        return text.forward([note])

    try:
        with Measure(contourer.device) as m:
            _, done = window.probability(x, lambda call, w: net.encode(w), net.decode,
                                         note_per_window=note_per_window, max_windows=preset.reference_windows)
    finally:
        text = net = None  # the fp32 LLM leaves before the next measurement
        if contourer.device.type == "cuda":
            torch.cuda.empty_cache()
    per_window = m.seconds / max(1, done)
    say(f"reference loop: {per_window:.2f} s per window ({done} of {total} windows timed)")
    return {"windows_timed": done, "windows": total, "llm_calls": llm_calls, "time_per_window_s": round(per_window, 4),
            "windows_s": round(per_window * total, 4), "extrapolated": done < total, "llm_load_s": round(load.seconds, 3),
            "peak_gpu_mib": m.gpu_mib, "peak_host_mib": m.host_mib}


def _fp32_llm_bytes(shape: dict) -> int:
    h, layers, inter, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"] or 2 * shape["hidden_size"], shape["vocab_size"] or 300
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * inter
    return 4 * (layers * per_layer + 2 * vocab * h)


def _fits(nbytes: int, device) -> bool:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < free - 4 * 2**30
    import psutil

    return nbytes < psutil.virtual_memory().available - 2 * 2**30


def bench_training(contourer, preset: Preset, say, steps: int | None = None) -> dict:
    """The product's training step (``training.step``: prompt tuning through the frozen LLM, Dice + CE,
    AdamW, autocast on the GPU) on a batch ``train_batch`` of ``train_patch``, timed after one warm-up
    step. The U-Net is a copy of the contourer's (same weights), so contouring is left as it was."""
    import torch

    from ..model.network import TextConditionedUNet
    from ..training.step import TrainableModel, TrainStep, adamw

    device = contourer.device
    text = contourer.text
    steps = steps or preset.train_steps
    if contourer.offload_llm:
        text.move_llm(device)
    ckpt = preset.activation_checkpointing
    net = TextConditionedUNet(contourer.network.config, activation_checkpointing=ckpt)
    net.load_state_dict(contourer.network.state_dict())
    model = TrainableModel(net, text).to(device)
    if contourer.channels_last:
        net.to(memory_format=torch.channels_last_3d)
    text.set_gradient_checkpointing(ckpt)
    model.train()
    optimizer = adamw(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = TrainStep(model, optimizer, device, precision=contourer.precision if device.type == "cuda" else "fp32")
    b = preset.train_batch
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, *preset.train_patch, generator=gen).to(device)
    y = (torch.rand(b, 1, *preset.train_patch, generator=gen) > 0.7).float().to(device)
    if contourer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    prompts = [NOTES[i % len(NOTES)] for i in range(b)]
    times, peak_gpu, peak_host = [], 0.0, 0.0
    try:
        for i in range(steps + 1):
            with Measure(device) as m:
                step(x, y, prompts)  # the LLM runs every step: gradients reach the prompt vectors
            if i:
                times.append(m.seconds)
                peak_gpu = max(peak_gpu, m.gpu_mib or 0)
                peak_host = max(peak_host, m.host_mib)
            say(f"training step {i}{' (warm-up)' if not i else ''}: {m.seconds:.2f} s")
    finally:
        text.eval()
        text.set_gradient_checkpointing(False)
        optimizer.zero_grad(set_to_none=True)
        del model, net, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step_s = med(times)
    return {"batch": b, "patch": list(preset.train_patch), "steps_timed": len(times), "step_s": step_s,
            "per_input_s": round(step_s / b, 4), "activation_checkpointing": ckpt,
            "peak_gpu_mib": peak_gpu if device.type == "cuda" else None, "peak_host_mib": peak_host,
            "trainable_parameters": trainable}


# -- orchestration -------------------------------------------------------------------------------------

def run_bench(preset: Preset, work: Path, *, what: set[str], llm: str | None = None, bundle: str | None = None,
              offload_modes: bool = False, scaleout: int = 0, say=lambda m: None) -> dict:
    import torch

    from ..inference.contourer import Contourer
    from ..model.device import resolve_device

    device = resolve_device(preset.device)
    report: dict = {"preset": asdict(preset), "environment": environment(device), "measured": {}, "notes": []}
    report["parameters"] = parameter_counts()
    work.mkdir(parents=True, exist_ok=True)
    if bundle and not llm:  # the bundle's own LLM, found where the bundle says
        from ..model.llm import resolve_source

        source = json.loads((Path(bundle) / "config.json").read_text())["text_encoder"]["source"]
        llm_path, made_s = resolve_source(source), 0.0
        llm = source
    elif llm:
        llm_path, made_s = Path(llm), 0.0
    else:
        say(f"random LLM of shape {preset.llm_shape} ({preset.llm_dtype})")
        llm_path, made_s = random_llm_folder(preset.llm_shape, work, "bf16" if preset.llm_dtype in ("bf16", "int8") else "fp32")
    report["llm"] = {"folder": str(llm_path), "shape": preset.llm_shape, "dtype": preset.llm_dtype,
                     "made_s": round(made_s, 2), "random_weights": not llm}
    if bundle:
        text_dim = json.loads((Path(bundle) / "config.json").read_text())["network"]["text_dim"] or 0
    else:
        text_dim = json.loads((llm_path / "config.json").read_text())["hidden_size"]
    bundle_path = Path(bundle) if bundle else make_bundle(
        work / f"bundle-{preset.name}-{os.getpid()}", llm_path, feature_size=preset.feature_size, roi=preset.roi,
        spacing=preset.spacing, overlap=preset.overlap, name=f"bench-{preset.name}", version="0", text_dim=text_dim)
    say(f"loading the model on {device}")
    with Measure(device) as load:
        contourer = Contourer.from_bundle(bundle_path, device=str(device), llm=llm if not bundle else None,
                                          dtype=preset.llm_dtype, roi_size=preset.roi,
                                          overlap=preset.overlap, sw_batch_size=preset.sw_batch_size,
                                          precision=preset.precision, channels_last=preset.channels_last,
                                          compile=preset.compile, cache_features=preset.cache_features,
                                          offload_llm=preset.offload_llm)
    m = report["measured"]
    m["model_load"] = {"seconds": round(load.seconds, 3), "peak_gpu_mib": load.gpu_mib, "peak_host_mib": load.host_mib}
    ct = synthetic_ct(preset.ct_size, preset.ct_spacing)
    notes = preset.notes or NOTES
    if "window-ratio" in what:
        say("per-window time, multimodal vs vision-only")
        m["window_ratio"] = bench_window_ratio(preset, device, text_dim, max(3, preset.repeats))
    if "encode" in what:
        m["note_encoding"] = bench_note_encoding(contourer, notes, max(3, preset.repeats))
    if "contour" in what:
        m["contour"] = bench_contour(contourer, ct, notes, preset.repeats, say, preset.edited_note)
        if offload_modes and device.type == "cuda":
            m["memory_modes"] = bench_memory_modes(contourer, ct, notes, say)
    if "reference" in what:
        m["reference"] = bench_reference(contourer, ct, notes[0], preset, llm if bundle else llm_path, say)
        if "contour" in what and "skipped" not in m["reference"]:
            ours = m["contour"]["windows_s"] + m["contour"]["encode_note_s"]
            m["reference"]["ratio_to_optimized_windows_plus_encode"] = round(m["reference"]["windows_s"] / ours, 2)
    if "train" in what:
        say("training steps")
        try:
            m["training"] = bench_training(contourer, preset, say)
        except torch.OutOfMemoryError as exc:
            m["training"] = {"error": f"out of GPU memory: {str(exc)[:300]}"}
    if scaleout and bundle:
        m["scaleout"] = {"skipped": "--scaleout trains the preset's own random model; leave out --bundle"}
    elif scaleout:
        say(f"scale-out: {scaleout} processes")
        from .scaleout import bench_scaleout

        m["scaleout"] = bench_scaleout(preset, llm_path, scaleout, max(2, preset.train_steps), say)
    try:
        report["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    report["summary"] = summary(report)
    return report


def bench_memory_modes(contourer, ct, notes, say) -> dict:
    """Peak GPU memory of one contour (new CT, note already encoded) with the LLM resident and with
    it moved off after encoding; feature cache in host memory in both, so it does not count against
    the GPU. The edited note that follows includes encoding it (and, offloaded, the LLM's round trip)."""
    import torch

    modes = {}
    saved = contourer.cache_features, contourer.offload_llm
    try:
        for name, offload in (("llm_resident", False), ("llm_offloaded", True)):
            contourer.cache_features, contourer.offload_llm = "host", offload
            contourer.text.clear_cache()
            if offload:
                contourer._offload()
            else:
                contourer.text.move_llm(contourer.device)
            _fresh_ct(contourer)
            contourer.encode_notes([notes[5]])  # the embedding exists (and the LLM left, if offloading)
            torch.cuda.empty_cache()
            with Measure(contourer.device) as m:
                result = contourer.contour(ct, notes[5])
            with Measure(contourer.device) as e:
                contourer.contour(ct, notes[6])
            modes[name] = {"end_to_end_s": round(m.seconds, 4), "peak_gpu_mib": m.gpu_mib,
                           "edited_note_s": round(e.seconds, 4), "edited_peak_gpu_mib": e.gpu_mib,
                           "windows": result.windows, "feature_cache": result.feature_cache}
            say(f"{name}: peak GPU {m.gpu_mib} MiB, {m.seconds:.2f} s; edited note {e.seconds:.2f} s")
    finally:
        contourer.cache_features, contourer.offload_llm = saved
        contourer.text.move_llm(contourer.device)
        _fresh_ct(contourer)
    return modes


def summary(report: dict) -> dict:
    """The headline numbers, flat (what docs/performance.md tabulates)."""
    m = report["measured"]
    c, w, r, t = m.get("contour", {}), m.get("window_ratio", {}), m.get("reference", {}), m.get("training", {})
    s = {"preset": report["preset"]["name"], "device": report["environment"]["device"],
         "gpu": report["environment"].get("gpu"), "cpu": report["environment"]["cpu"],
         "llm_dtype": report["preset"]["llm_dtype"], "unet_precision": report["preset"]["precision"],
         "roi": report["preset"]["roi"], "overlap": report["preset"]["overlap"],
         "vision_only_params_m": report["parameters"]["vision_only_millions"],
         "multimodal_trainable_params_m": report["parameters"]["multimodal_trainable_millions"],
         "model_load_s": m.get("model_load", {}).get("seconds"),
         "encode_note_s": m.get("note_encoding", {}).get("encode_note_s"),
         "windows": c.get("windows"), "time_per_window_s": c.get("time_per_window_s"),
         "end_to_end_s": c.get("end_to_end_s"), "edited_note_s": c.get("edited_note_s"),
         "warm_up_s": c.get("warm_up_s"),
         "llm_calls_per_contour": c.get("llm_calls_per_contour"),
         "peak_gpu_mib": c.get("peak_gpu_mib"), "peak_host_mib": c.get("peak_host_mib"),
         "window_ratio_multimodal_over_vision": w.get("ratio"),
         "reference_windows_s": r.get("windows_s"), "reference_ratio": r.get("ratio_to_optimized_windows_plus_encode"),
         "train_per_input_s": t.get("per_input_s"), "train_peak_gpu_mib": t.get("peak_gpu_mib"),
         "train_peak_host_mib": t.get("peak_host_mib")}
    if "memory_modes" in m:
        s["peak_gpu_mib_llm_resident"] = m["memory_modes"]["llm_resident"]["peak_gpu_mib"]
        s["peak_gpu_mib_llm_offloaded"] = m["memory_modes"]["llm_offloaded"]["peak_gpu_mib"]
    if "scaleout" in m and "throughput_ratio" in m["scaleout"]:
        s["scaleout_ratio"] = m["scaleout"]["throughput_ratio"]
        s["gradient_mib_per_step"] = m["scaleout"]["gradient_mib_per_step"]
    return s
