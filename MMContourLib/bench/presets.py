"""Benchmark presets (``mmcontour bench --preset``) and the notes the benchmarks encode."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

NOTES = [f"{n}, {s}, {side} side" for side in ("left", "right")
         for s in ("breast conserving surgery", "total mastectomy surgery")
         for n in ("N0", "N1mi", "N1", "N2", "N3")]

TINY_LLM = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=None)
SMOLLM2_135M_SHAPE = dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152)
THORAX_CT = dict(size=(512, 512, 120), spacing=(0.98, 0.98, 2.5))


@dataclass
class Preset:
    name: str
    llm_shape: dict
    feature_size: int
    spacing: tuple[float, float, float]
    roi: tuple[int, int, int]
    overlap: float
    ct_size: tuple[int, int, int] = THORAX_CT["size"]
    ct_spacing: tuple[float, float, float] = THORAX_CT["spacing"]
    device: str = "cpu"
    llm_dtype: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    cache_features: str = "auto"
    offload_llm: bool = False
    edited_note: bool = True
    sw_batch_size: int = 1
    repeats: int = 3
    train_patch: tuple[int, int, int] = (32, 32, 16)
    train_batch: int = 2
    train_steps: int = 3
    activation_checkpointing: bool = False
    reference_windows: int = 0  # 0: the whole CT; K: time K windows and scale by the window count
    notes: list[str] = field(default_factory=list)


def _llama7b(layers: int | None = None) -> dict:
    from .randomllm import LLAMA2_7B_SHAPE

    return {**LLAMA2_7B_SHAPE, **({"num_hidden_layers": layers} if layers else {})}


PRESETS = {
    "tiny": lambda: Preset("tiny", TINY_LLM, 4, (6.0, 6.0, 8.0), (32, 32, 16), 0.25, ct_size=(64, 56, 30),
                           ct_spacing=(4.0, 4.0, 6.0), llm_dtype="fp32", repeats=3, train_steps=2),
    "small": lambda: Preset("small", SMOLLM2_135M_SHAPE, 16, (2.0, 2.0, 6.0), (128, 128, 64), 0.25,
                            llm_dtype="fp32", train_patch=(128, 128, 64), reference_windows=0),
    # 16 GB of host memory hold the 13.5 GB bf16 LLM and one fp32 channels-last U-Net window of
    # ~1 M voxels (~1.3 kB per voxel measured; bf16 autocast halves that but was no faster on this
    # CPU); 112 slices cover the whole 100-slice model grid of a 120 x 2.5 mm CT in one window.
    "cpu": lambda: Preset("cpu", _llama7b(), 48, (1.0, 1.0, 3.0), (96, 96, 112), 0.1, llm_dtype="bf16",
                          precision="fp32", channels_last=True, repeats=1, train_patch=(64, 64, 32),
                          train_steps=2, reference_windows=2),
    "gpu-7b": lambda: Preset("gpu-7b", _llama7b(), 48, (1.0, 1.0, 3.0), (384, 384, 128), 0.5, device="cuda",
                             llm_dtype="bf16", precision="bf16", channels_last=True, repeats=3,
                             train_patch=(384, 384, 128), train_batch=2, train_steps=4,
                             activation_checkpointing=True),
}



def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None
