"""Shared fixtures: a tiny random Llama (saved like a real Llama-2 folder) and a tiny bundle that uses it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM + BPE tokenizer written with save_pretrained (the Llama-2 folder layout)."""
    from MMContourLib.bench.randomllm import make_random_llama

    return make_random_llama(folder, seed=seed)


@pytest.fixture()
def one_thread():
    """Tiny tensors: one thread is fastest, and a busy shared CPU makes several threads spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama")


@pytest.fixture(scope="session")
def other_llm_dir(tmp_path_factory) -> Path:
    """Same architecture, different weights: must be refused by a bundle made with tiny_llm_dir."""
    return make_tiny_llama(tmp_path_factory.mktemp("llm2") / "other-llama", seed=1)


def make_ct(size=(48, 40, 24), spacing=(4.0, 4.0, 6.0), direction=None, origin=(-96.0, -80.0, -72.0),
            seed=0, dtype=sitk.sitkInt16) -> sitk.Image:
    """A small synthetic thorax-like CT in HU: air, a body ellipse of soft tissue, a 'lung' pair."""
    rng = np.random.default_rng(seed)
    x, y, z = size
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    cx, cy = (x - 1) / 2, (y - 1) / 2
    body = ((xx - cx) / (0.42 * x)) ** 2 + ((yy - cy) / (0.35 * y)) ** 2 <= 1
    lung = (((np.abs(xx - cx) - 0.18 * x) / (0.12 * x)) ** 2 + ((yy - cy) / (0.2 * y)) ** 2) <= 1
    arr = np.full((z, y, x), -1000.0)
    arr[body] = 40
    arr[lung & body] = -800
    arr += rng.normal(0, 10, arr.shape)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return sitk.Cast(img, dtype)


def make_bundle(llm_dir: Path | None, path: Path, feature_size: int = 4, roi=(32, 32, 16),
                spacing=(6.0, 6.0, 8.0), seed: int = 0) -> Path:
    """A randomly initialised bundle (real classes, real files) small enough for CPU tests."""
    import torch
    from MMContourLib.model.bundle import InferenceConfig, ModelBundle
    from MMContourLib.model.network import NetworkConfig, TextConditionedUNet
    from MMContourLib.image.preprocess import PreprocessConfig
    from MMContourLib.model.text import TextEncoderSpec, build_text_encoder

    kind = "causal-lm" if llm_dir else "none"
    text = build_text_encoder(TextEncoderSpec(kind=kind, source=str(llm_dir or ""), name="tiny-llama" if llm_dir else ""))
    torch.manual_seed(seed)
    net = TextConditionedUNet(NetworkConfig(feature_size=feature_size, text_dim=text.dim))
    bundle = ModelBundle.from_models(net, text, preprocessing=PreprocessConfig(spacing=spacing),
                                     inference=InferenceConfig(roi_size=roi, overlap=0.25), name="tiny-test",
                                     version="0.0.1")
    return bundle.save(path)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    return make_bundle(tiny_llm_dir, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_vision_bundle(tmp_path_factory) -> Path:
    return make_bundle(None, tmp_path_factory.mktemp("bundles") / "tiny-vision")
