"""``Contourer``: load a bundle once, contour many CTs and notes.

One contour: CT -> model grid -> note embedding (the LLM runs once per new note, cached) ->
sliding window over the U-Net (Gaussian blending) -> probabilities back on the CT's own grid ->
threshold -> mask with exactly the CT's geometry -> anatomical range check (``inference.anatomy``).

Speed and memory (docs/performance.md): the U-Net's encoder never sees the note, so its features
per window are kept for the last CT (on the GPU when they fit, else in host memory, else not at
all) and an edited note re-runs only alignment + decoder; the LLM can leave the GPU after
encoding (``offload_llm``); running out of GPU memory halves the window batch, then drops the
feature cache, then continues on the CPU, each time with a warning instead of a crash.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..model.bundle import ModelBundle
from ..model.device import PRECISIONS, resolve_device
from ..model.windows import SlidingWindow
from ..note.clinical import ClinicalNote, note_from_any
from ..image.preprocess import (ModelInput, probabilities_to_ct_grid, structures_to_ct_grid, threshold,
                                to_model_grid)
from ..note.structures import UNION
from ..note.targets import structures_for_note
from . import anatomy
from ..image.ctstats import ct_statistics
from .review import Review, ReviewConfig, review_contour, structure_confidence_reasons, structure_reasons

#: What ``ContourResult.segments`` gives: the structures, their union ``CTV``, or both.
SEGMENT_MODES = ("both", "regions", "union")

Progress = Callable[[str, int, int], None]
FEATURE_CACHE_MODES = ("auto", "device", "host", "off")


class Cancelled(RuntimeError):
    """The caller asked to stop; nothing was written."""


def check_loss_weights(weights: Mapping, classes: Sequence[str]) -> dict[str, float]:
    """A bundle's ``inference.loss_weight_correction``, refused unless every name is one of its structures and
    every weight a number >= 1 (a weight below 1 would grow a structure the training never favoured)."""
    out = {}
    for name, w in (weights or {}).items():
        if name not in classes:
            raise ValueError(f"loss_weight_correction names {name!r}, which is not one of the bundle's structures "
                             f"({', '.join(classes) or 'none: a single-CTV bundle'})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 1:
            raise ValueError(f"loss_weight_correction of {name} is {w!r}; it must be a number >= 1")
        out[name] = float(w)
    return out


def undo_loss_weights(prob: np.ndarray, classes: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Per-structure foreground probabilities ``prob`` (K, ...) of a network whose training loss weighed structure
    k's voxels ``weights[k]`` (w_k) times the background beside them, with that weighting undone.

    Where the network cannot tell whether a voxel is inside k or just outside, the weighted loss is lowest when
    it answers w_k q_k / (w_k q_k + 1 - q_k), q_k being how likely the voxel is inside: with w_k = 5 a voxel
    inside one time in six is drawn. Dividing p_k by w_k and renormalising against the background,
    1 - sum(p), is Bayes' rule run backwards: q_k again, so a structure is drawn where it is more likely than
    not. Where the network is sure (p near 0 or 1) nothing changes; structures without a weight are only
    renormalised."""
    if not weights:
        return prob
    scale = np.array([1.0 / float(weights.get(name, 1.0)) for name in classes], np.float32)
    scaled = prob * scale.reshape((-1,) + (1,) * (prob.ndim - 1))
    background = np.clip(1.0 - prob.sum(0), 0.0, None)
    return (scaled / np.maximum(background + scaled.sum(0), 1e-12)).astype(prob.dtype, copy=False)


def structure_volumes(labels: sitk.Image, classes: Sequence[str]) -> dict[str, float]:
    """{structure: cc} of a label image (1 + index in ``classes``; 0 outside)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(classes) + 1)
    voxel_cc = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: round(float(counts[i + 1]) * voxel_cc, 2) for i, name in enumerate(classes)}


@dataclass
class ContourResult:
    mask: sitk.Image
    probability: sitk.Image
    note: ClinicalNote
    prompt: str
    provenance: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    feature_cache: str = ""  # "hit", "device", "host" (stored there for the next note), "off" or "" (n/a)
    anatomical_range: dict = field(default_factory=dict)  # what inference.anatomy removed, and why
    review: Review = field(default_factory=Review)
    # per-structure bundles: the structure of each CTV voxel (1 + its position in ``classes``; 0 outside)
    labels: sitk.Image | None = None
    classes: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()  # the structures the note's guideline calls for

    @property
    def voxels(self) -> int:
        return int(sitk.GetArrayViewFromImage(self.mask).sum())

    @property
    def volume_cc(self) -> float:
        return self.voxels * float(np.prod(self.mask.GetSpacing())) / 1000.0

    def structure_volumes(self) -> dict[str, float]:
        """{structure: cc} for every structure the bundle has (0 for those it did not draw); {} for a bundle
        with one CTV output."""
        return {} if self.labels is None else structure_volumes(self.labels, self.classes)

    @property
    def structures(self) -> dict[str, sitk.Image]:
        """{structure: uint8 mask on the CT grid} for each structure drawn (non-empty), in table order; a
        bundle with one CTV output: {} (see ``segments``)."""
        if self.labels is None:
            return {}
        arr = sitk.GetArrayViewFromImage(self.labels)
        present = set(np.unique(arr).tolist())
        out = {}
        for i, name in enumerate(self.classes):
            if i + 1 in present:
                m = sitk.GetImageFromArray((arr == i + 1).astype(np.uint8))
                m.CopyInformation(self.mask)
                out[name] = m
        return out

    def segments(self, mode: str = "both") -> dict[str, sitk.Image]:
        """The segments to write: "union" -> {"CTV": mask}; "regions" -> one per structure drawn; "both" ->
        CTV first, then the structures. A bundle with one CTV output gives {"CTV": mask} for every mode."""
        if mode not in SEGMENT_MODES:
            raise ValueError(f"structures {mode!r}: use one of {', '.join(SEGMENT_MODES)}")
        if mode == "union" or self.labels is None:
            return {UNION: self.mask}
        structures = self.structures
        if mode == "regions":
            return structures or {UNION: self.mask}  # nothing drawn: the (empty) CTV, not no segment at all
        return {UNION: self.mask, **structures}

    def structure_summary(self) -> list[dict]:
        """One entry per structure the bundle has: name, volume (cc), whether the note's guideline calls for
        it, and the review reasons naming it."""
        by = {}
        for r in self.review.reasons:
            if r.structure:
                by.setdefault(r.structure, []).append(r.text)
        return [{"name": name, "volume_cc": cc, "expected": name in self.expected, "flags": by.get(name, [])}
                for name, cc in self.structure_volumes().items()]

    def summary(self) -> dict:
        return {"prompt": self.prompt, "voxels": self.voxels, "volume_cc": round(self.volume_cc, 2),
                "structures": self.structure_summary(),
                "windows": self.windows, "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
                "feature_cache": self.feature_cache, "provenance": self.provenance,
                "anatomical_range": self.anatomical_range, "review": self.review.to_dict()}


class Contourer:
    """Loads a bundle once and contours many CTs / notes.

    Performance options (all keep the result; see docs/performance.md):
    ``precision`` of the U-Net (auto: bf16/fp16 autocast on a GPU, fp32 on the CPU),
    ``channels_last`` (3D channels-last memory layout), ``compile`` (``torch.compile`` the U-Net),
    ``cache_features`` (keep the encoder features of the last CT for a note edit: auto | device |
    host | off; ``feature_cache_bytes`` caps it), ``offload_llm`` (after each encoding, move the LLM to the
    CPU, or on the CPU release it; back when a new note needs it).
    ``anatomical_range`` (default on): remove what lies caudal to the lung bases, cranial to the cricoid
    or far from the target (``inference.anatomy``), reported in ``ContourResult.anatomical_range``.
    """

    def __init__(self, bundle: ModelBundle, llm: str | None = None, device: str = "auto", dtype: str = "auto",
                 roi_size: Sequence[int] | None = None, overlap: float | None = None, sw_batch_size: int = 1,
                 allow_download: bool = False, precision: str = "auto", channels_last: bool = False,
                 compile: bool = False, cache_features: str = "auto", feature_cache_bytes: int | None = None,
                 offload_llm: bool = False, anatomical_range: bool = True):
        self.bundle = bundle
        self.anatomical_range = anatomical_range
        self.review_config = ReviewConfig.for_bundle(bundle.inference.review)  # refuses a broken threshold early
        # refused early too: a name the network does not draw, or a weight below 1
        self.loss_weights = check_loss_weights(bundle.inference.loss_weight_correction, bundle.network.structures or ())
        self.device = resolve_device(device)
        self.network, self.text = bundle.build(self.device, llm=llm, dtype=dtype, allow_download=allow_download)
        self.roi_size = tuple(int(v) for v in (roi_size or bundle.inference.roi_size))
        if any(v % self.network.downsample_factor for v in self.roi_size):
            raise ValueError(f"window size {self.roi_size} must be a multiple of {self.network.downsample_factor}")
        self.overlap = float(bundle.inference.overlap if overlap is None else overlap)
        self.sw_batch_size = max(1, int(sw_batch_size))
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if cache_features not in FEATURE_CACHE_MODES:
            raise ValueError(f"cache_features {cache_features!r}: use one of {', '.join(FEATURE_CACHE_MODES)}")
        self.precision = precision
        self.channels_last = channels_last
        self.cache_features = cache_features
        self.feature_cache_bytes = feature_cache_bytes
        self.offload_llm = offload_llm
        self.fallbacks: list[str] = []  # what the out-of-memory handling had to do, in order
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has the same shape: pick the fastest kernels once
        if channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        self._encode, self._decode = self.network.encode, self.network.decode
        if compile:
            self._encode, self._decode = torch.compile(self._encode), torch.compile(self._decode)
        self._last_input: tuple[str, ModelInput] | None = None
        # (model input, settings, features per predictor call) of the last CT
        self._features: tuple[ModelInput, tuple, list[list[torch.Tensor]]] | None = None
        self._facts: tuple[ModelInput, dict] | None = None  # what the last CT shows, whatever the note
        if offload_llm and self.device.type == "cuda":  # on the CPU it is released after the first note
            self._offload()

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
                "prompt": prompt, "prompt_template_version": self.bundle.prompt_template_version,
                "loss_weight_correction": ", ".join(f"{k} /{w:g}" for k, w in self.loss_weights.items()),
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

    def _ct_facts(self, image: sitk.Image, model_input: ModelInput) -> dict:
        """The anatomical limits and the statistics of the CT ``model_input`` was made from: found once per
        CT, so a note edit does not pay for them again."""
        if self._facts is None or self._facts[0] is not model_input:
            self._facts = (model_input, {"limits": anatomy.find_limits(image) if self.anatomical_range else None,
                                         "stats": ct_statistics(image, self.bundle.preprocessing)})
        return self._facts[1]

    def encode_notes(self, notes: Sequence[ClinicalNote | str]) -> torch.Tensor | None:
        prompts = [note_from_any(n).to_prompt() for n in notes]
        if self.offload_llm and not self.text.is_cached(prompts):
            self.text.move_llm(self.device)
        g = self.text.encode(prompts)
        if self.offload_llm:
            self._offload()
        return g

    def _offload(self) -> None:
        """The LLM off the GPU (between notes), or on the CPU out of memory altogether (released, loaded
        again for the next new note: with a 7B model the U-Net then runs without its 13.5 GB beside it).
        A no-op for vision-only bundles."""
        if self.device.type == "cuda":
            self.text.move_llm("cpu")
            torch.cuda.empty_cache()
        else:
            self.text.release_llm()

    def probabilities(self, model_input: ModelInput, g: torch.Tensor | None, progress: Progress | None = None,
                      cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, int]:
        """Foreground probabilities (K, X, Y, Z) on the model grid, one per structure (K = 1: the CTV), by
        MONAI sliding window. Out of GPU
        memory: fewer windows per batch, then no feature cache, then the CPU (with a warning)."""
        while True:
            try:
                return self._sliding_window(model_input, g, progress, cancel)
            except torch.OutOfMemoryError as exc:
                self._features = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.sw_batch_size > 1:
                    self._fallback(f"out of GPU memory with {self.sw_batch_size} windows per batch; retrying with "
                                   f"{self.sw_batch_size // 2}")
                    self.sw_batch_size //= 2
                elif self.cache_features != "off":
                    self._fallback("out of GPU memory; retrying without the feature cache")
                    self.cache_features = "off"
                elif self.device.type != "cuda":
                    raise
                else:
                    self._fallback(f"out of GPU memory even for one {self.roi_size} window ({exc.__class__.__name__})"
                                   "; continuing on the CPU (slow). Use a smaller --roi, --offload-llm or a larger GPU")
                    self.device = torch.device("cpu")
                    self.network.to(self.device)

    def _fallback(self, message: str) -> None:
        self.fallbacks.append(message)
        warnings.warn(f"MMContour: {message}", RuntimeWarning, stacklevel=3)

    def _feature_budget(self, where: str) -> int:
        if self.feature_cache_bytes is not None:
            return int(self.feature_cache_bytes)
        if where == "device":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free - 2 * 2**30)  # headroom for the decoder's own activations
        try:
            import psutil

            available = psutil.virtual_memory().available
            # "available" counts page cache as free, including the pages of our own memory-mapped
            # LLM weights (safetensors), which the cache would then push out
            available -= psutil.Process().memory_info().shared
        except ImportError:  # pragma: no cover - psutil comes with accelerate
            available = 0
        return int(max(0, available) // 2)

    def _cache_target(self, nbytes: int) -> str:
        """Where the features of a whole CT (``nbytes``) are kept: device, host or off."""
        mode = self.cache_features
        if mode == "off" or self.network.align is None:  # vision-only: the note never changes the output
            return "off"
        if self.device.type == "cuda" and mode in ("auto", "device") and nbytes <= self._feature_budget("device"):
            return "device"
        if mode in ("auto", "host") and nbytes <= self._feature_budget("host"):
            return "host" if self.device.type == "cuda" else "device"
        return "off"

    def _sliding_window(self, model_input: ModelInput, g: torch.Tensor | None, progress: Progress | None,
                        cancel: Callable[[], bool] | None) -> tuple[np.ndarray, int]:
        x = torch.from_numpy(model_input.array)[None, None].to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        window = SlidingWindow(self.roi_size, self.overlap, self.sw_batch_size, self.precision)
        calls = window.calls(x.shape[2:])
        key = (self.roi_size, self.overlap, self.sw_batch_size, self.precision, self.channels_last, str(self.device))
        hit = self._features is not None and self._features[0] is model_input and self._features[1] == key
        cached = self._features[2] if hit else None
        self._cache_state = "hit" if cached is not None else ""
        store: list[list[torch.Tensor]] | None = None
        target = "off"

        def encode(call: int, windows: torch.Tensor) -> list[torch.Tensor]:
            nonlocal store, target
            if cached is not None:
                return [f.to(self.device, non_blocking=True) for f in cached[call]]
            feats = self._encode(windows)
            if call == 0:
                nbytes = sum(f.numel() * f.element_size() for f in feats) * calls
                target = self._cache_target(nbytes)
                store = [] if target != "off" else None
            if store is not None:
                store.append([f if target == "device" else f.to("cpu", non_blocking=True) for f in feats])
            return feats

        def check() -> None:
            if cancel is not None and cancel():
                raise Cancelled("contouring cancelled")

        if cached is None:
            self._features = None  # free the last CT's features before this one's are made
        prob, done = window.probability(
            x, encode, self._decode, g, cancel=check,
            progress=None if progress is None else (lambda done, total: progress("windows", done, total)))
        if cached is None:
            self._cache_state = target if store is not None else ("off" if self.network.align is not None else "")
            if store is not None:
                self._features = (model_input, key, store)
        return prob[0].float().cpu().numpy(), done

    def clear_feature_cache(self) -> None:
        self._features = None

    # -- the job ----------------------------------------------------------------------------------
    def contour(self, image: sitk.Image, note: ClinicalNote | str, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None) -> ContourResult:
        note = note_from_any(note)
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
        return self.from_probabilities(image, model_input, note, prob, windows, timings, report)

    def from_probabilities(self, image: sitk.Image, model_input: ModelInput, note: ClinicalNote, prob: np.ndarray,
                           windows: int = 0, timings: dict | None = None,
                           progress: Progress | None = None) -> ContourResult:
        """The rest of ``contour`` from the network's probabilities ``prob`` (K, X, Y, Z) on the model grid
        (``probabilities``): the bundle's loss-weight correction, the CT-grid mask, anatomical range,
        structures and review. Measurements that compare corrections reuse one network pass through it."""
        timings = dict(timings or {})
        report = progress or (lambda stage, done, total: None)
        prompt = note.to_prompt()
        t = time.perf_counter()
        report("postprocess", 0, 1)
        prob = undo_loss_weights(prob, self.network.config.structures or (), self.loss_weights)
        prob_img = probabilities_to_ct_grid(prob.sum(0), model_input)  # the whole CTV: every structure
        mask = threshold(prob_img, self.bundle.inference.threshold)
        facts = self._ct_facts(image, model_input)
        if self.anatomical_range:
            mask, range_report = anatomy.anatomical_range(image, mask, facts["limits"])
        else:
            range_report = {"applied": False, "reason": "switched off (Contourer(anatomical_range=False))"}
        classes = self.network.config.structures
        labels, expected = None, ()
        if classes:
            labels = structures_to_ct_grid(prob, model_input, mask)
            expected = tuple(structures_for_note(note))
            if self.anatomical_range:
                labels, strays = anatomy.structure_strays(labels, classes)
                if strays:
                    mask = sitk.Cast(labels > 0, sitk.sitkUInt8)
                    range_report["components"] = list(range_report.get("components", [])) + strays
                    range_report["dropped_cc"] = round(sum(c["cc"] for c in range_report["components"]), 2)
        review = review_contour(image, prob_img, mask, note, self.bundle.training, self.bundle.preprocessing,
                                config=self.review_config, anatomical_range=range_report,
                                input_notes=model_input.notes, ct_stats=facts["stats"])
        if classes:
            drawn = structure_volumes(labels, classes)
            review.reasons += structure_reasons(drawn, expected, note, self.bundle.training, self.review_config)
            voxel_cc = float(np.prod(model_input.grid.GetSpacing())) / 1000.0
            reasons, measures = structure_confidence_reasons(prob, classes, voxel_cc, self.review_config,
                                                             threshold=self.bundle.inference.threshold, drawn=drawn,
                                                             expected=expected)
            review.reasons += reasons
            review.measures["structure_confidence"] = measures
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = sum(timings.values())
        report("postprocess", 1, 1)
        return ContourResult(mask, prob_img, note, prompt, self.provenance(prompt), timings, windows,
                             getattr(self, "_cache_state", ""), range_report, review, labels, classes, expected)

