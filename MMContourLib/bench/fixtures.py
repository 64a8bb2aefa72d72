"""Synthetic inputs shared by the benches and the tests (``Testing/conftest.py``): a CT-like volume,
a random-weight LLM folder, a random bundle. Real classes and real files throughout."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .presets import THORAX_CT
from .randomllm import make_random_llama


def synthetic_ct(size=THORAX_CT["size"], spacing=THORAX_CT["spacing"], origin=None, direction=None, seed: int = 0,
                 dtype=None):
    """A thorax-like CT in HU (air, a body ellipse of soft tissue, a lung pair, noise). ``origin`` None:
    centred on 0; ``dtype``: a SimpleITK pixel type (default int16)."""
    import numpy as np
    import SimpleITK as sitk

    x, y, z = size
    yy, xx = np.mgrid[:y, :x]
    cx, cy = (x - 1) / 2, (y - 1) / 2
    body = ((xx - cx) / (0.42 * x)) ** 2 + ((yy - cy) / (0.35 * y)) ** 2 <= 1
    lung = (((np.abs(xx - cx) - 0.18 * x) / (0.12 * x)) ** 2 + ((yy - cy) / (0.2 * y)) ** 2) <= 1
    plane = np.full((y, x), -1000.0, np.float32)
    plane[body] = 40
    plane[lung & body] = -800
    arr = np.random.default_rng(seed).normal(0, 10, (z, y, x))
    arr += plane  # the same slice on every z
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in origin) if origin is not None
                  else (-x * spacing[0] / 2, -y * spacing[1] / 2, -z * spacing[2] / 2))
    if direction is not None:
        img.SetDirection(direction)
    return sitk.Cast(img, sitk.sitkInt16 if dtype is None else dtype)


def random_llm_folder(shape: dict, work: Path, dtype: str) -> tuple[Path, float]:
    """A random Llama of ``shape`` saved like a real one (made once, reused from ``work``), and the
    seconds making it took."""
    import torch

    tag = "-".join(f"{k[:3]}{v}" for k, v in sorted(shape.items()) if v is not None) + f"-{dtype}"
    folder = work / f"llama-{tag}"
    if (folder / "config.json").exists():
        return folder, 0.0
    start = time.perf_counter()
    tmp = work / f".{folder.name}.tmp{os.getpid()}"
    make_random_llama(tmp, **shape, dtype=torch.bfloat16 if dtype == "bf16" else None)
    tmp.rename(folder)
    return folder, time.perf_counter() - start


def make_bundle(folder: Path, llm: Path | None = None, *, feature_size: int = 4, roi=(32, 32, 16),
                spacing=(6.0, 6.0, 8.0), overlap: float = 0.25, name: str = "tiny-test", version: str = "0.0.1",
                seed: int = 0, text_dim: int | None = None, structures: tuple[str, ...] = ()) -> Path:
    """A randomly initialised bundle naming the LLM folder ``llm`` (None: vision-only). With
    ``text_dim`` the LLM is not loaded (a 7B one takes minutes): the prompt vectors are random of that
    width and the bundle has no fingerprint yet (the Contourer records it on first use). ``structures``:
    one output per structure (``note.structures.structure_classes()``); none: one CTV output."""
    import torch

    from ..image.preprocess import PreprocessConfig
    from ..model.bundle import InferenceConfig, ModelBundle
    from ..model.network import NetworkConfig, TextConditionedUNet
    from ..model.text import TextEncoderSpec, build_text_encoder

    kind = "causal-lm" if llm else "none"
    spec = TextEncoderSpec(kind=kind, source=str(llm or ""), name=Path(llm).name if llm else "",
                           hidden_size=text_dim or 0)
    text = None if text_dim else build_text_encoder(spec)
    torch.manual_seed(seed)
    net = TextConditionedUNet(NetworkConfig(feature_size=feature_size, text_dim=text_dim or text.dim,
                                            structures=tuple(structures)))
    fields = dict(preprocessing=PreprocessConfig(spacing=spacing), inference=InferenceConfig(roi_size=roi, overlap=overlap),
                  name=name, version=version)
    if text is not None:
        return ModelBundle.from_models(net, text, **fields).save(folder)
    weights = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    weights["text.prompt_vectors"] = torch.randn(spec.num_sets, spec.num_vectors, text_dim) * 0.02
    weights["text.seg_embedding"] = torch.randn(text_dim) * 0.02
    return ModelBundle(network=net.config, text_encoder=spec, weights=weights, **fields).save(folder)
