"""``Contourer``: load a bundle once, contour many CTs and notes.

One contour: CT -> model grid -> note embedding (the LLM runs once per new note, cached) ->
sliding window over the U-Net (Gaussian blending) -> probabilities back on the CT's own grid ->
threshold -> mask with exactly the CT's geometry.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .bundle import ModelBundle
from .note import PROMPT_TEMPLATE_VERSION, ClinicalNote, note_from_any
from .preprocess import ModelInput, probabilities_to_ct_grid, threshold, to_model_grid

Progress = Callable[[str, int, int], None]


class Cancelled(RuntimeError):
    """The caller asked to stop; nothing was written."""


@dataclass
class ContourResult:
    mask: sitk.Image
    probability: sitk.Image
    note: ClinicalNote
    prompt: str
    provenance: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0

    @property
    def voxels(self) -> int:
        return int(sitk.GetArrayViewFromImage(self.mask).sum())

    @property
    def volume_cc(self) -> float:
        return self.voxels * float(np.prod(self.mask.GetSpacing())) / 1000.0

    def summary(self) -> dict:
        return {"prompt": self.prompt, "voxels": self.voxels, "volume_cc": round(self.volume_cc, 2),
                "windows": self.windows, "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
                "provenance": self.provenance}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding_window_inference visits for an image of ``shape`` (after its padding)."""
    total = 1
    for s, r in zip(shape, roi):
        s = max(s, r)
        interval = max(int(r * (1 - overlap)), 1)
        total *= 1 if s <= r else math.ceil((s - r) / interval) + 1
    return total


class Contourer:
    def __init__(self, bundle: ModelBundle, llm: str | None = None, device: str = "auto", dtype: str = "auto",
                 roi_size: Sequence[int] | None = None, overlap: float | None = None, sw_batch_size: int = 1,
                 allow_download: bool = False):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.network, self.text = bundle.build(self.device, llm=llm, dtype=dtype, allow_download=allow_download)
        self.roi_size = tuple(int(v) for v in (roi_size or bundle.inference.roi_size))
        if any(v % self.network.downsample_factor for v in self.roi_size):
            raise ValueError(f"window size {self.roi_size} must be a multiple of {self.network.downsample_factor}")
        self.overlap = float(bundle.inference.overlap if overlap is None else overlap)
        self.sw_batch_size = sw_batch_size
        self._last_input: tuple[str, ModelInput] | None = None

    @classmethod
    def from_bundle(cls, path, llm: str | None = None, device: str = "auto", **kwargs) -> "Contourer":
        return cls(ModelBundle.load(path), llm=llm, device=device, **kwargs)

    @property
    def llm_calls(self) -> int:
        return self.text.calls

    def provenance(self, prompt: str) -> dict[str, str]:
        spec = self.text.spec
        return {"bundle_name": self.bundle.name, "bundle_version": self.bundle.version,
                "bundle_id": self.bundle.bundle_id, "bundle_path": str(self.bundle.path or ""),
                "llm_name": spec.name, "llm_fingerprint": spec.fingerprint, "text_encoder": spec.kind,
                "prompt": prompt, "prompt_template_version": PROMPT_TEMPLATE_VERSION,
                "mmcontour_version": __version__, "device": str(self.device)}

    # -- steps ------------------------------------------------------------------------------------
    def prepare(self, image: sitk.Image) -> ModelInput:
        """Model-grid input for ``image``; the last one is kept, so a note edit skips re-sampling."""
        arr = sitk.GetArrayViewFromImage(image)
        h = hashlib.sha1(np.ascontiguousarray(arr).view(np.uint8)).hexdigest()
        key = f"{h}:{image.GetSize()}:{image.GetSpacing()}:{image.GetOrigin()}:{image.GetDirection()}"
        if self._last_input is not None and self._last_input[0] == key:
            return self._last_input[1]
        model_input = to_model_grid(image, self.bundle.preprocessing, min_size=self.roi_size)
        self._last_input = (key, model_input)
        return model_input

    def encode_notes(self, notes: Sequence[ClinicalNote | str]) -> torch.Tensor | None:
        prompts = [note_from_any(n).to_prompt() for n in notes]
        return self.text.encode(prompts)

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def probabilities(self, model_input: ModelInput, g: torch.Tensor | None, progress: Progress | None = None,
                      cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, int]:
        """Foreground probability (X, Y, Z) on the model grid, by MONAI sliding window."""
        from monai.inferers import sliding_window_inference

        x = torch.from_numpy(model_input.array)[None, None].to(self.device)
        total = count_windows(x.shape[2:], self.roi_size, self.overlap)
        done = 0
        if g is not None:
            g = g.to(self.device)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if cancel is not None and cancel():
                raise Cancelled("contouring cancelled")
            with self._autocast():
                logits = self.network(window, g)
            done += window.shape[0]
            if progress is not None:
                progress("windows", done, total)
            return torch.softmax(logits.float(), 1)[:, 1:2]

        with torch.inference_mode():
            prob = sliding_window_inference(x, self.roi_size, self.sw_batch_size, predictor, self.overlap,
                                            mode="gaussian", padding_mode="constant", cval=0.0)
        return prob[0, 0].float().cpu().numpy(), done

    # -- the job ----------------------------------------------------------------------------------
    def contour(self, image: sitk.Image, note: ClinicalNote | str, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None) -> ContourResult:
        note = note_from_any(note)
        prompt = note.to_prompt()
        timings: dict[str, float] = {}
        report = progress or (lambda stage, done, total: None)

        t = time.perf_counter()
        report("preprocess", 0, 1)
        model_input = self.prepare(image)
        timings["preprocess"] = time.perf_counter() - t
        if cancel is not None and cancel():
            raise Cancelled("contouring cancelled")

        t = time.perf_counter()
        report("encode-note", 0, 1)
        g = self.encode_notes([note])
        timings["encode_note"] = time.perf_counter() - t

        t = time.perf_counter()
        prob, windows = self.probabilities(model_input, g, report, cancel)
        timings["windows"] = time.perf_counter() - t

        t = time.perf_counter()
        report("postprocess", 0, 1)
        prob_img = probabilities_to_ct_grid(prob, model_input)
        mask = threshold(prob_img, self.bundle.inference.threshold)
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = sum(timings.values())
        report("postprocess", 1, 1)
        return ContourResult(mask, prob_img, note, prompt, self.provenance(prompt), timings, windows)


def load_contourer(bundle: str | Path, **kwargs) -> Contourer:
    return Contourer.from_bundle(bundle, **kwargs)
