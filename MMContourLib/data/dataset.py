"""Manifest datasets for training.

The cases come from ``manifest.read_cases``. Each case is resampled once to the model grid and
cached (MONAI ``CacheDataset``); a training sample is then a random patch of it
(``RandCropByPosNegLabeld`` around the CTV or elsewhere in the body) with intensity augmentation,
plus the case's prompt.

Every random choice is derived from ``(seed, epoch, position in the epoch)``: the data order of
an epoch and the transform state of each sample. So a resumed run sees exactly the samples an
uninterrupted run would, and ``world_size`` processes with batch ``b`` see the same global
batches as one process with batch ``world_size * b``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..image.ctstats import ct_statistics
from ..image.preprocess import PreprocessConfig, mask_to_model_grid, to_model_grid
from ..note.targets import UNKNOWN_CLASS
from .manifest import Case

if TYPE_CHECKING:  # MONAI takes seconds to import: only the functions that build pipelines load it
    from monai.data import CacheDataset
    from monai.transforms import Compose

#: Voxels above this (scaled 0..1; 0.3 is -400 HU) are in the body: negative patches are centred there.
BODY_THRESHOLD = 0.3


def select_fraction(cases: Sequence[Case], fraction: float, seed: int) -> list[Case]:
    """A seeded subset of ``round(fraction * n)`` cases (at least one). For one seed, a smaller fraction's
    subset is contained in a larger one's, so data-efficiency runs differ only by the data added."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1]; got {fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    if fraction == 1:
        return ordered
    order = np.random.default_rng(seed).permutation(len(ordered))
    keep = max(1, int(round(fraction * len(ordered))))
    return [ordered[i] for i in sorted(order[:keep])]


# -- model-grid cache -----------------------------------------------------------------------------

class CaseError(ValueError):
    """One case of a manifest cannot be used for training; the message names the case and the file."""


class LoadCaseOnModelGridd:
    """{"ct", "ctv", "regions", ...} paths -> on the model grid: "image" (1, X, Y, Z) float32 0..1, "label"
    (1, X, Y, Z) uint8 (CTV fraction > 0.5), "soft" (1, X, Y, Z) float32 (the CTV fraction of each voxel)
    and "emphasis" (1, X, Y, Z) float32, the fraction of each voxel inside the regions
    whose label values are ``emphasis_labels`` (zeros without a regions map or labels; see losses.py),
    grown by ``emphasis_margin_mm`` (``grow_emphasis``);
    "classes" (1, X, Y, Z) uint8, with ``structures`` (the network's foreground classes): the structure of
    each CTV voxel (1 + its position in ``structures``, the one covering most of the voxel), from the
    regions map where the CTV is; ``UNKNOWN_CLASS`` where the case has no regions map or its regions
    there belong to no structure (an unsplit axilla, a CTV part no structure covers); 0 elsewhere.
    "structure_cc": the volume of each structure the case has (cc, on the model grid).
    "ct_stats" is ``ct_statistics`` of the CT as read (its own grid), for the bundle's training range."""

    def __init__(self, preprocessing: PreprocessConfig, emphasis_labels: Sequence[int] = (),
                 structures: Sequence[str] = (), emphasis_margin_mm: float = 0.0):
        self.preprocessing = preprocessing
        self.emphasis_labels = tuple(int(v) for v in emphasis_labels)
        self.structures = tuple(structures)
        self.emphasis_margin_mm = float(emphasis_margin_mm)

    def __call__(self, data: dict) -> dict:
        import SimpleITK as sitk

        def read(kind: str):
            from ..image.readwrite import read_image

            try:
                return read_image(data[kind])
            except (OSError, ValueError, RuntimeError) as exc:
                raise CaseError(f"case {data['case_id']}: cannot use its {kind} file {data[kind]}: {exc}") from None

        ct = read("ct")
        try:
            model_input = to_model_grid(ct, self.preprocessing)
        except ValueError as exc:
            raise CaseError(f"case {data['case_id']}: its CT {data['ct']} cannot be used: {exc}") from None
        stats = ct_statistics(ct, self.preprocessing)
        ctv = read("ctv")
        fraction = mask_to_model_grid(ctv, model_input).astype(np.float32)
        label = fraction > 0.5
        emphasis = np.zeros(label.shape, np.float32)
        regions = read("regions") if data.get("regions") and (self.emphasis_labels or self.structures) else None
        if self.emphasis_labels and regions is not None:
            values = sitk.GetArrayViewFromImage(regions)
            inside = sitk.GetImageFromArray(np.isin(values, self.emphasis_labels).astype(np.uint8))
            inside.CopyInformation(regions)
            emphasis = grow_emphasis(mask_to_model_grid(inside, model_input).astype(np.float32),
                                     model_input.grid.GetSpacing(), self.emphasis_margin_mm)
        classes = np.where(fraction > 0, UNKNOWN_CLASS, 0).astype(np.uint8)
        structure_cc: dict[str, float] = {}
        if self.structures and regions is not None:
            try:
                classes, structure_cc = _classes_on_model_grid(ctv, regions, fraction, model_input, self.structures)
            except ValueError as exc:
                raise CaseError(f"case {data['case_id']}: cannot use its regions file {data['regions']}: {exc}") from None
        return {"case_id": data["case_id"], "prompt": data["prompt"], "image": model_input.array[None],
                "label": label[None].astype(np.uint8), "soft": fraction[None], "emphasis": emphasis[None],
                "classes": classes[None], "structure_cc": structure_cc, "ct_stats": stats}


def grow_emphasis(emphasis: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """The emphasis map grown by ``margin_mm`` (the largest value within that distance, in mm on the grid's
    ``spacing``, x y z): the loss weight then steps up well outside the emphasised structures' borders,
    so a border voxel weighs the same on either side of the border. Without the margin the weight steps at
    the border itself, and where the network is unsure where the border is, calling a voxel inside costs
    1 / (1 + w) of calling it outside: the structures come out too large (v11's level 4: 41-64 cc for about
    25 cc, docs/results.md)."""
    if margin_mm <= 0:
        return emphasis
    from scipy import ndimage

    # the array is (X, Y, Z) as mask_to_model_grid gives it; the footprint: an ellipsoid of radius margin_mm
    radius = [margin_mm / float(s) for s in spacing]
    half = [int(np.floor(r)) for r in radius]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    footprint = sum((g / r) ** 2 for g, r in zip(grids, radius)) <= 1.0
    return ndimage.grey_dilation(emphasis, footprint=footprint).astype(np.float32)


def _classes_on_model_grid(ctv, regions, fraction: np.ndarray, model_input, structures: Sequence[str]):
    """The structure of each model-grid voxel the CTV touches (see LoadCaseOnModelGridd) and each
    structure's volume (cc: the sum of its voxel fractions)."""
    import SimpleITK as sitk

    from ..image.grid import same_grid
    from ..note.targets import REGION_LABELS, region_structure

    if not same_grid(ctv, regions):
        raise ValueError("its regions map is not on the CT's grid")
    lut = np.full(256, UNKNOWN_CLASS, np.uint8)  # a CTV voxel in no known structure stays unknown
    for key, value in REGION_LABELS.items():
        name = region_structure(key)
        if name in structures:
            lut[value] = structures.index(name) + 1
    inside = sitk.GetArrayViewFromImage(ctv) > 0
    on_ct = np.where(inside, lut[sitk.GetArrayViewFromImage(regions).astype(np.uint8)], 0)
    best = np.zeros(fraction.shape, np.float32)
    classes = np.zeros(fraction.shape, np.uint8)
    voxel_cc = float(np.prod(model_input.grid.GetSpacing())) / 1000.0
    volumes = {}
    for value in np.unique(on_ct):
        if value == 0:
            continue
        part = sitk.GetImageFromArray((on_ct == value).astype(np.uint8))
        part.CopyInformation(ctv)
        f = mask_to_model_grid(part, model_input)
        take = f > best
        classes[take], best[take] = value, f[take]
        if value != UNKNOWN_CLASS:
            volumes[structures[value - 1]] = round(float(f.sum()) * voxel_cc, 2)
    classes[(fraction > 0) & (classes == 0)] = UNKNOWN_CLASS
    return classes, volumes


def build_cache(cases: Sequence[Case], preprocessing: PreprocessConfig, patch_size: Sequence[int],
                cache_rate: float = 1.0, num_workers: int = 0, progress: bool = True,
                emphasis_labels: Sequence[int] = (), structures: Sequence[str] = (),
                shift_margin_mm: float = 0.0, emphasis_margin_mm: float = 0.0) -> CacheDataset:
    """The deterministic part of the pipeline, computed once per case: model grid, padding to at least the
    patch, and the foreground / in-body background voxel indices the crop sampler draws from.
    ``shift_margin_mm``: air (0, i.e. -1000 HU, and background labels) added on both sides along R-L and
    A-P, so that the crops, which stay inside the padded volume, put the body at varying distances from
    the patch's edges (a network must not learn where the field of view ends)."""
    from monai.data import CacheDataset
    from monai.transforms import BorderPadd, CastToTyped, Compose, FgBgToIndicesd, SpatialPadd

    items = [{"case_id": c.case_id, "ct": str(c.ct), "ctv": str(c.ctv), "prompt": c.prompt,
              "regions": str(c.regions) if c.regions else ""} for c in cases]
    keys = ("image", "label", "soft", "emphasis", "classes")
    margin = [int(round(shift_margin_mm / s)) for s in preprocessing.spacing[:2]] + [0]
    margin = [v for v in margin for _ in (0, 1)]  # (x-, x+, y-, y+, z-, z+)
    transform = Compose([
        LoadCaseOnModelGridd(preprocessing, emphasis_labels, structures, emphasis_margin_mm),
        SpatialPadd(keys, spatial_size=tuple(patch_size), mode="constant"),
        *([BorderPadd(keys, spatial_border=margin, mode="constant")] if any(margin) else []),
        FgBgToIndicesd("label", image_key="image", image_threshold=BODY_THRESHOLD),
        CastToTyped(("label_fg_indices", "label_bg_indices"), dtype=np.int32),  # half the memory of int64
    ])
    try:
        return CacheDataset(items, transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress,
                            copy_cache=False)
    except RuntimeError as exc:  # MONAI wraps a transform's error as "applying transform <object at 0x...>"
        raise case_error_in(exc) or exc


def cached_statistics(cache: CacheDataset) -> list[dict]:
    """``ct_statistics`` of the cases the cache holds, without reading a CT again (cases beyond the
    cache rate are read only when sampled, in loader workers, and are left out)."""
    return [case_item(cache, i)["ct_stats"] for i in range(cache.cache_num)]


def case_item(cache: CacheDataset, index: int) -> dict:
    """``cache[index]``, a case that fails to load raising its CaseError (the case id and file), not MONAI's
    "applying transform <object at 0x...>": MONAI retries a case it could not cache on every access."""
    try:
        return cache[index]
    except RuntimeError as exc:
        raise case_error_in(exc) or exc


def case_error_in(exc: BaseException) -> CaseError | None:
    """The CaseError behind an exception MONAI wrapped (it chains the original as the cause)."""
    while exc is not None:
        if isinstance(exc, CaseError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass(frozen=True)
class AugmentConfig:
    pos: float = 2.0  # relative frequency of patches centred on the CTV ...
    neg: float = 1.0  # ... and on other body voxels (the other breast, the nodes of a node-negative case)
    scale: float = 0.1  # intensity x (1 + U(-s, s))
    shift: float = 0.05  # intensity + U(-o, o) (0..1 scaled HU: 0.05 = 100 HU)
    noise_std: float = 0.01
    prob: float = 0.5


def sample_transforms(patch_size: Sequence[int], augment: AugmentConfig = AugmentConfig()) -> Compose:
    """Random patch around the CTV (pos) or the body (neg), then intensity augmentation. No flips: a
    left-right flip would contradict the note's laterality."""
    from monai.transforms import (Compose, RandCropByPosNegLabeld, RandGaussianNoised, RandScaleIntensityd,
                                  RandShiftIntensityd)

    return Compose([
        RandCropByPosNegLabeld(("image", "label", "soft", "emphasis", "classes"), label_key="label", spatial_size=tuple(patch_size),
                               pos=augment.pos, neg=augment.neg, num_samples=1, fg_indices_key="label_fg_indices",
                               bg_indices_key="label_bg_indices"),
        RandScaleIntensityd("image", factors=augment.scale, prob=augment.prob),
        RandShiftIntensityd("image", offsets=augment.shift, prob=augment.prob),
        RandGaussianNoised("image", prob=augment.prob, std=augment.noise_std),
    ])


class PatchDataset(torch.utils.data.Dataset):
    """Indexed by ``(case index, sample seed)``: the same key always gives the same patch."""

    def __init__(self, cache: CacheDataset, transforms: Compose):
        self.cache = cache
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        case = case_item(self.cache, index)  # a case beyond the cache rate is loaded here, in a loader worker
        self.transforms.set_random_state(seed=int(seed))
        out = self.transforms(dict(case))
        out = out[0] if isinstance(out, list) else out
        return {"image": _plain(out["image"], torch.float32), "label": _plain(out["label"], torch.float32),
                "soft": _plain(out["soft"], torch.float32), "emphasis": _plain(out["emphasis"], torch.float32),
                "classes": _plain(out["classes"], torch.uint8), "prompt": case["prompt"], "case_id": case["case_id"]}


def _plain(x, dtype) -> torch.Tensor:
    """MetaTensor / ndarray -> a plain contiguous tensor (MONAI metadata is not needed past the crop)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype).contiguous()


def collate(samples: Sequence[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "label": torch.stack([s["label"] for s in samples]),
            "soft": torch.stack([s["soft"] for s in samples]), "emphasis": torch.stack([s["emphasis"] for s in samples]),
            "classes": torch.stack([s["classes"] for s in samples]), "prompt": [s["prompt"] for s in samples], "case_id": [s["case_id"] for s in samples]}


def parse_oversample(rule: str) -> tuple[str, str, int]:
    """``"column=value:K"`` -> (column, value, K): the training cases whose manifest ``column`` is ``value``
    are visited K times per epoch (a rare kind of case, e.g. ``side=both:4`` for bilateral notes)."""
    try:
        match, k = rule.rsplit(":", 1)
        column, value = match.split("=", 1)
        k = int(k)
    except ValueError:
        raise ValueError(f"oversample rule {rule!r}: write COLUMN=VALUE:K, e.g. side=both:4") from None
    if not column.strip() or k < 1:
        raise ValueError(f"oversample rule {rule!r}: give a manifest column and K >= 1")
    return column.strip(), value.strip(), k


def case_visits(cases: Sequence[Case], rules: Sequence[str] = ()) -> list[int]:
    """Indices into ``cases``, each case as often per epoch as the largest K of the rules it matches (once
    when none does). A rule whose column no case has, or that matches no case, is refused: a typo would
    otherwise train the plain mix without a word."""
    repeat = [1] * len(cases)
    for rule in rules:
        column, value, k = parse_oversample(rule)
        if not any(column in c.row for c in cases):
            known = sorted({key for c in cases for key in c.row})
            raise ValueError(f"oversample rule {rule!r}: the manifest has no column {column!r} "
                             f"(it has {', '.join(known)})")
        hits = [i for i, c in enumerate(cases) if str(c.row.get(column, "")).strip() == value]
        if not hits:
            raise ValueError(f"oversample rule {rule!r}: no training case has {column} = {value!r}")
        for i in hits:
            repeat[i] = max(repeat[i], k)
    return [i for i, r in enumerate(repeat) for _ in range(r)]


def steps_per_epoch(num_cases: int, global_batch: int) -> int:
    return max(1, -(-num_cases // global_batch))


def epoch_plan(num_cases: int, epoch: int, seed: int, batch_size: int, world_size: int = 1,
               rank: int = 0) -> list[list[tuple[int, int]]]:
    """This rank's batches of ``(case index, sample seed)`` for one epoch.

    The epoch visits every case once in a seeded order (wrapping round to fill the last global batch);
    global batch ``j`` is positions ``j*B .. j*B+B-1`` (B = batch_size * world_size) and rank ``r``
    takes the ``r``-th run of ``batch_size`` of them. A sample's seed depends on (seed, epoch,
    position) only.
    """
    global_batch = batch_size * world_size
    steps = steps_per_epoch(num_cases, global_batch)
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_cases)
    positions = np.arange(steps * global_batch)
    cases = order[positions % num_cases]
    seeds = [int(s) for s in np.random.SeedSequence([seed, epoch]).generate_state(len(positions), np.uint32)]
    batches = []
    for step in range(steps):
        start = step * global_batch + rank * batch_size
        batches.append([(int(cases[p]), seeds[p]) for p in range(start, start + batch_size)])
    return batches
