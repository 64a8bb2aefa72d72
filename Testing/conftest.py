"""Shared fixtures: a tiny random Llama (saved like a real Llama-2 folder) and a tiny bundle that uses it
(the same builders as the benches: ``MMContourLib.bench.fixtures``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk

from MMContourLib.bench import fixtures

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
    return fixtures.synthetic_ct(size, spacing, origin, direction, seed, dtype)


def make_bundle(llm_dir: Path | None, path: Path, feature_size: int = 4, roi=(32, 32, 16),
                spacing=(6.0, 6.0, 8.0), seed: int = 0, structures: tuple[str, ...] = ()) -> Path:
    """A randomly initialised bundle (real classes, real files) small enough for CPU tests. ``structures``:
    one output per structure (``note.structures.structure_classes()``); none: one CTV output."""
    return fixtures.make_bundle(path, llm_dir, feature_size=feature_size, roi=roi, spacing=spacing, seed=seed,
                                structures=structures)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    return make_bundle(tiny_llm_dir, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_structure_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    """A random per-structure bundle: the 14 classes of ``note.structures.structure_classes()``."""
    from MMContourLib.note.structures import structure_classes

    return make_bundle(tiny_llm_dir, tmp_path_factory.mktemp("bundles") / "tiny-structures",
                       structures=structure_classes())


@pytest.fixture(scope="session")
def tiny_vision_bundle(tmp_path_factory) -> Path:
    return make_bundle(None, tmp_path_factory.mktemp("bundles") / "tiny-vision")
