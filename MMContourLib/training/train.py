"""Training: manifest -> model bundle (``mmcontour train``).

One step (``step.py``): a batch of random patches (``data/dataset.py``) -> the text encoder on the
batch's *unique* prompts, with gradients into the prompt vectors (the LLM stays frozen) -> U-Net ->
Dice + CE (weights 1, 1; optionally more weight on the regions a note switches on and off and
partial-volume targets, ``losses.py``) -> AdamW with per-step warmup + cosine (MONAI's
``WarmupCosineSchedule``). AMP on CUDA.

Every epoch ends with the same sequence on rank 0: validation (every ``val_every`` epochs and
at the last), ``best/`` when validation Dice improved, ``last/``, then ``checkpoint.pt`` (trainable
weights, optimiser, scheduler, scaler, RNG states, history, config), each written atomically.
Since every random draw of the data comes from (seed, epoch, position), ``--resume`` after a
kill at any moment replays exactly what an uninterrupted run does.

Distributed (``torchrun``): one process per GPU (or CPU process, gloo). Each loads the frozen LLM
once; only the trainable modules (U-Net + prompt vectors) are wrapped in DistributedDataParallel,
and each rank takes a disjoint ``batch_size`` share of every global batch, so N processes with
batch b train the model one process with batch N*b would. The output folder must be shared.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..image.ctstats import training_range
from ..data.dataset import (AugmentConfig, PatchDataset, build_cache, case_item, case_visits, cached_statistics, collate,
                            epoch_plan, parse_oversample, sample_transforms, select_fraction, steps_per_epoch)
from ..data.manifest import manifest_hash, read_cases
from ..image.preprocess import PreprocessConfig
from ..model.device import DeviceError, resolve_device
from ..model.text import TextEncoderSpec, build_text_encoder
from ..model.windows import SlidingWindow
from ..note.clinical import PROMPT_TEMPLATE_VERSION
from ..note.structures import structure_classes
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, TrainingError, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state, write_logs)
from .config import DEFAULT_EMPHASIS_LABELS, DEFAULT_SOURCES, TEXT_ENCODER_KINDS
from .step import TrainableModel, TrainStep, adamw

#: Settings that do not change what is learned: a resumed run may change them.
RUNTIME_FIELDS = ("manifest", "out", "epochs", "device", "num_workers", "cache_rate", "progress", "llm", "name",
                  "version", "gradient_checkpointing", "activation_checkpointing")


@dataclass
class TrainConfig:
    """Everything a run depends on (defaults: the paper's settings, docs/method.md)."""

    manifest: str = ""
    out: str = ""
    text_encoder: str = "llm"  # llm | encoder | none (vision-only baseline)
    llm: str = ""  # folder, .gguf or pkg:...; default per text_encoder (SmolLM2 / MiniLM)
    num_prompt_sets: int = 2
    num_prompt_vectors: int = 8
    prompt_template: str = PROMPT_TEMPLATE_VERSION  # how the LLM reads a note (note.clinical.PROMPT_TEMPLATES)
    feature_size: int = 48
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)
    patch: tuple[int, int, int] = (384, 384, 128)
    batch_size: int = 2  # per process
    patches_per_case: int = 1  # patches drawn from each training case per epoch
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 10
    val_every: int = 1
    val_overlap: float = 0.25
    fraction: float = 1.0
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    region_weight: float = 0.0  # extra loss weight on the emphasised regions (0: the paper's plain Dice + CE)
    emphasis_labels: tuple[int, ...] = DEFAULT_EMPHASIS_LABELS  # label values in the manifest's regions maps
    # the emphasised regions grown by this much (mm) before weighting, so the weight does not step at the
    # structures' borders (data.dataset.grow_emphasis); 0: at the borders, as bundles up to v11 were trained
    emphasis_margin_mm: float = 0.0
    soft_labels: bool = False  # partial-volume targets (CTV fraction per model-grid voxel) instead of 0/1
    # weight of the class-balanced cross-entropy (per-structure networks; losses.py): every structure present
    # weighs as much as the breast, so small levels still taken for background are pulled out of it
    class_balance: float = 0.0
    # air (mm) added at the training CTs' left, right, front and back before patches are drawn, so that a
    # patch's edges fall at varying distances from the body: without it a patch as wide as the field of
    # view always shows the body at the same place, and the network learns that place (a CT with a wider
    # field of view, or an oblique one whose model grid is larger, then loses the small levels)
    shift_margin_mm: float = 60.0
    # "COLUMN=VALUE:K": training cases whose manifest COLUMN is VALUE are visited K times per epoch (rare
    # kinds of case: "side=both:4" for bilateral notes); data.dataset.case_visits
    oversample: tuple[str, ...] = ()
    # regions: one output per structure (note.structures), learned from the regions maps (cases without one
    # teach the union); union: one CTV output (bundles before per-structure output); auto: regions when any
    # training case has a regions map
    structures: str = "auto"
    # a bundle folder whose weights the run starts from (fine-tuning: the shipped model adapted to a
    # hospital's own data); same network, structure classes and text model; "" trains from scratch
    init: str = ""
    pos: float = AugmentConfig.pos
    neg: float = AugmentConfig.neg
    num_workers: int = 0
    cache_rate: float = 1.0
    device: str = "auto"
    dtype: str = "auto"  # LLM dtype
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 with loss scaling)
    gradient_checkpointing: bool = False  # LLM activations recomputed in backward (memory for 7B models)
    activation_checkpointing: bool = False  # U-Net blocks recomputed in backward (memory for paper-size patches)
    allow_download: bool = False
    name: str = "mmcontour"
    version: str = "0"
    progress: bool = True

    def __post_init__(self):
        self.spacing = tuple(float(v) for v in self.spacing)
        self.patch = tuple(int(v) for v in self.patch)
        self.emphasis_labels = tuple(int(v) for v in self.emphasis_labels)
        self.oversample = tuple(str(v) for v in self.oversample)
        for rule in self.oversample:
            parse_oversample(rule)
        if self.region_weight < 0:
            raise ValueError(f"region weight must be >= 0; got {self.region_weight}")
        if self.class_balance < 0:
            raise ValueError(f"class balance weight must be >= 0; got {self.class_balance}")
        if not 0 <= self.emphasis_margin_mm <= 100:
            raise ValueError(f"emphasis margin must be 0-100 mm; got {self.emphasis_margin_mm}")
        if not 0 <= self.shift_margin_mm <= 500:
            raise ValueError(f"shift margin must be 0-500 mm; got {self.shift_margin_mm}")
        if self.structures not in STRUCTURE_MODES:
            raise ValueError(f"structures {self.structures!r}: use one of {', '.join(STRUCTURE_MODES)}")
        if self.text_encoder not in TEXT_ENCODER_KINDS:
            raise ValueError(f"text encoder {self.text_encoder!r}: use one of {', '.join(TEXT_ENCODER_KINDS)}")
        if len(self.patch) != 3 or any(v <= 0 or v % 16 for v in self.patch):
            raise ValueError(f"patch size {self.patch}: give three multiples of 16 (the U-Net halves it four times)")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing {self.spacing}: give three positive values in mm")
        for name in ("batch_size", "epochs", "val_every", "patches_per_case", "feature_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1]; got {self.fraction}")

    @property
    def text_kind(self) -> str:
        return TEXT_ENCODER_KINDS[self.text_encoder]

    @property
    def text_source(self) -> str:
        return self.llm or DEFAULT_SOURCES[self.text_kind]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"], d["patch"] = list(self.spacing), list(self.patch)
        d["emphasis_labels"] = list(self.emphasis_labels)
        d["oversample"] = list(self.oversample)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


STRUCTURE_MODES = ("auto", "regions", "union")


@dataclass
class TrainResult:
    out: Path
    best: Path
    last: Path
    epochs: int
    best_val_dice: float | None
    best_epoch: int | None
    history: list[dict] = field(default_factory=list)
    seconds_per_epoch: float = 0.0

    def summary(self) -> dict:
        return {"out": str(self.out), "best": str(self.best), "last": str(self.last), "epochs": self.epochs,
                "best_val_dice": self.best_val_dice, "best_epoch": self.best_epoch,
                "final_train_loss": self.history[-1]["train_loss"] if self.history else None,
                "seconds_per_epoch": round(self.seconds_per_epoch, 3)}


# -- distributed ----------------------------------------------------------------------------------

@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over the ranks (nccl reduces GPU tensors only, hence ``device``)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` describes (RANK / WORLD_SIZE / LOCAL_RANK); a no-op without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
        here = True
    return DistContext(rank, world, local_rank, here)


# -- the run --------------------------------------------------------------------------------------

def _check_resume_config(saved: TrainConfig, config: TrainConfig) -> None:
    changed = [f.name for f in fields(TrainConfig) if f.name not in RUNTIME_FIELDS
               and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        detail = ", ".join(f"{n}: checkpoint {getattr(saved, n)!r}, now {getattr(config, n)!r}" for n in changed)
        raise TrainingError(f"a resumed run keeps the settings it started with (only {', '.join(RUNTIME_FIELDS)} may "
                            f"change); these differ: {detail}")


def validate(model: TrainableModel, cache, patch: Sequence[int], overlap: float, device: torch.device,
             amp: bool) -> float:
    """Mean Dice over the validation cases, on the model grid (the contour's sliding window, threshold 0.5)."""
    from monai.metrics import compute_dice

    model.eval()
    window = SlidingWindow(tuple(patch), overlap, precision="auto" if amp else "fp32")
    network = model.network
    scores = []
    with torch.no_grad():
        for i in range(len(cache)):
            case = case_item(cache, i)
            g = model.embed([case["prompt"]])
            x = torch.as_tensor(np.asarray(case["image"]))[None].float().to(device)
            prob, _ = window.probability(x, lambda call, w: network.encode(w), network.decode, g)
            pred = (prob.sum(1, keepdim=True) >= 0.5).float().cpu()  # the whole CTV: all structures
            truth = torch.as_tensor(np.asarray(case["label"]))[None].float()
            scores.append(float(compute_dice(pred, truth, include_background=True, ignore_empty=False)[0, 0]))
    model.train()
    return float(np.mean(scores))


def structure_volume_range(cache) -> dict[str, list[float]]:
    """{structure: [smallest, median, largest]} volume (cc) over the cached training cases that have it: what
    the review calls "far below the sizes seen in training"."""
    volumes: dict[str, list[float]] = {}
    for i in range(cache.cache_num):
        for name, cc in case_item(cache, i)["structure_cc"].items():
            volumes.setdefault(name, []).append(cc)
    return {name: [round(float(min(v)), 2), round(float(np.median(v)), 2), round(float(max(v)), 2)]
            for name, v in volumes.items()}


def init_bundle(path: str, network, text):
    """The bundle at ``path`` that ``--init`` starts from, checked against this run's ``network`` and ``text``:
    refused, naming the difference, when its network (width, structure classes, text width) or text model
    is not the run's."""
    from ..model.bundle import BundleError, ModelBundle

    try:
        bundle = ModelBundle.load(path)
    except (OSError, BundleError, ValueError) as exc:
        raise TrainingError(f"--init {path}: cannot load that bundle: {exc}") from None
    if bundle.network != network.config:
        theirs, ours = bundle.network.to_dict(), network.config.to_dict()
        diff = ", ".join(f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k])
        raise TrainingError(f"--init {path}: its network is not this run's: {diff}")
    if bundle.text_encoder.fingerprint != text.spec.fingerprint:
        raise TrainingError(f"--init {path}: it was trained with text model {bundle.text_encoder.name!r} "
                            f"(fingerprint {bundle.text_encoder.fingerprint}), this run uses {text.spec.name!r} "
                            f"({text.spec.fingerprint})")
    return bundle


def train(config: TrainConfig, resume: bool = False,
          callbacks: Sequence[Callable[[str, dict], None]] = ()) -> TrainResult:
    """Train a bundle into ``config.out`` (``best/``, ``last/``, ``checkpoint.pt``, logs).

    ``callbacks`` get ``("step", {...})`` after each optimiser step and ``("epoch", record)`` after each
    epoch's checkpoint is written; an exception raised there stops the run (the checkpoint stays).
    """
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    state = None
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        _check_resume_config(TrainConfig.from_dict(state["config"]), config)
    elif resume and int(os.environ.get("RANK", "0")) == 0:  # killed before its first checkpoint: start afresh
        print(f"mmcontour train: no checkpoint in {out} yet; starting from the beginning", file=sys.stderr)
    elif checkpoint_path.exists():
        raise TrainingError(f"{out} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it "
                            "or choose another --out")

    try:
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    except DeviceError as exc:
        raise TrainingError(str(exc)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = init_distributed(device)
    try:
        return _train(config, state, out, device, dist, callbacks)
    except KeyboardInterrupt:
        if dist.is_main and (out / CHECKPOINT_NAME).exists():
            print(f"mmcontour train: interrupted; {out} keeps its last finished epoch: continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        dist.close()


def _train(config: TrainConfig, state: dict | None, out: Path, device: torch.device, dist: DistContext,
           callbacks) -> TrainResult:
    from tqdm import tqdm

    from monai.optimizers import WarmupCosineSchedule

    from ..model.bundle import InferenceConfig, ModelBundle
    from ..model.network import NetworkConfig, TextConditionedUNet, count_parameters

    cases = read_cases(config.manifest)
    train_cases = [c for c in cases if c.split == config.train_split]
    if not train_cases:
        splits = sorted({c.split for c in cases})
        raise TrainingError(f"manifest {config.manifest} has no cases with split '{config.train_split}' "
                            f"(splits present: {', '.join(splits) or 'none'})")
    train_cases = select_fraction(train_cases, config.fraction, config.seed)
    val_cases = sorted((c for c in cases if c.split == config.val_split), key=lambda c: c.case_id)
    m_hash = manifest_hash(config.manifest)
    if state is not None and state["manifest_hash"] != m_hash:
        raise TrainingError(f"the manifest changed since the checkpoint was written ({state['manifest_hash']} -> "
                            f"{m_hash}); resume with the same manifest or start a new run")
    global_batch = config.batch_size * dist.world_size
    if state is not None and state["global_batch"] != global_batch:
        raise TrainingError(f"the checkpoint was trained with a global batch of {state['global_batch']} "
                            f"({state['world_size']} process(es)); now {global_batch}: choose --batch-size so that "
                            "processes x batch size is the same")

    # Text encoder: rank 0 first, so a GGUF file is de-quantised into the cache once.
    text = None
    for turn in ([0, 1] if dist.enabled else [0]):
        if (turn == 0) == dist.is_main:
            text = build_text_encoder(
                TextEncoderSpec(kind=config.text_kind, source=config.text_source, num_sets=config.num_prompt_sets,
                                num_vectors=config.num_prompt_vectors),
                template=config.prompt_template,
                device=device, dtype=config.dtype, allow_download=config.allow_download,
                gradient_checkpointing=config.gradient_checkpointing)
        dist.barrier()
    if state is not None and state["text_fingerprint"] != text.spec.fingerprint:
        raise TrainingError(f"the text model at {config.text_source!r} is not the one this run started with "
                            f"(fingerprint {text.spec.fingerprint}, checkpoint {state['text_fingerprint']}); "
                            "point --llm at the same model")
    with_regions = sum(1 for c in train_cases if c.regions)
    if config.structures == "regions" and not with_regions:
        raise TrainingError(f"--structures regions needs sub-region label maps: the manifest {config.manifest} has "
                            "no 'regions' column values for its training cases (use --structures union)")
    structures = structure_classes() if config.structures == "regions" or (
        config.structures == "auto" and with_regions) else ()
    torch.manual_seed(config.seed)
    network = TextConditionedUNet(NetworkConfig(feature_size=config.feature_size, text_dim=text.dim,
                                                structures=structures),
                                  activation_checkpointing=config.activation_checkpointing)
    model = TrainableModel(network, text).to(device)
    start = init_bundle(config.init, network, text) if config.init else None
    if start is not None and state is None:  # a resumed run has its own weights in the checkpoint
        start.load_weights_into(network, text)
    if text.dim is not None and state is None and start is None:  # standardise note embeddings over this run's notes
        with torch.no_grad():
            network.text_norm.reset_from(text(sorted({c.prompt for c in train_cases})))
    model.train()
    optimizer = adamw(model, config.lr, config.weight_decay)
    try:
        visits = case_visits(train_cases, config.oversample)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    n_steps = steps_per_epoch(len(visits) * config.patches_per_case, global_batch)
    total_steps = n_steps * config.epochs
    warmup = int(round(config.warmup_epochs * n_steps))
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total_steps)

    start_epoch, step, history = 0, 0, []
    best = {"val_dice": None, "epoch": None}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the saved state carries the old run's length; a resumed run may change --epochs
        scheduler.warmup_steps, scheduler.t_total = min(warmup, total_steps), total_steps
        set_rng_state(state["rng"])
        start_epoch, step, history, best = state["epoch"], state["step"], list(state["history"]), dict(state["best"])
    if start_epoch >= config.epochs and dist.is_main:
        print(f"mmcontour train: {out} already finished {start_epoch} epochs", file=sys.stderr)

    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(ddp, optimizer, device, scheduler, precision="auto" if config.amp else "fp32",
                           region_weight=config.region_weight, balance=config.class_balance)
    if state is not None:
        train_step.scaler.load_state_dict(state["scaler"])

    show = config.progress and dist.is_main
    patch = config.patch
    preprocessing = PreprocessConfig(spacing=config.spacing)
    emphasis_labels = config.emphasis_labels if config.region_weight > 0 else ()
    if emphasis_labels and not any(c.regions for c in train_cases):
        raise TrainingError(f"--region-weight {config.region_weight} needs sub-region label maps: the manifest "
                            f"{config.manifest} has no 'regions' column values for its training cases")
    train_cache = build_cache(train_cases, preprocessing, patch, config.cache_rate, config.num_workers, show,
                              emphasis_labels, structures, shift_margin_mm=config.shift_margin_mm,
                              emphasis_margin_mm=config.emphasis_margin_mm)
    val_cache = build_cache(val_cases, preprocessing, patch, 1.0, config.num_workers, show) \
        if (val_cases and dist.is_main) else None
    dataset = PatchDataset(train_cache, sample_transforms(patch, AugmentConfig(pos=config.pos, neg=config.neg)))
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main and state is None:
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    training_summary = {
        "seed": config.seed, "data_fraction": config.fraction, "manifest": str(config.manifest),
        "manifest_hash": m_hash, "train_cases": len(train_cases), "val_cases": len(val_cases),
        "batch_size": global_batch, "patch": list(patch), "lr": config.lr, "processes": dist.world_size,
        "text_encoder": config.text_encoder, "trainable_parameters": count_parameters(model),
        "region_weight": config.region_weight, "soft_labels": config.soft_labels,
        **({"emphasis_margin_mm": config.emphasis_margin_mm} if config.region_weight and config.emphasis_margin_mm
           else {}),
        **({"class_balance": config.class_balance} if config.class_balance else {}),
        "shift_margin_mm": config.shift_margin_mm,
        **({"oversample": list(config.oversample), "visits_per_epoch": len(visits)} if config.oversample else {}),
        "prompt_template_version": config.prompt_template,
        **({"init_bundle": {"path": str(config.init), "bundle_id": start.bundle_id,
                            "prompt_template_version": start.prompt_template_version}} if start else {}),
        "ct_range": training_range(cached_statistics(train_cache)),  # what the review checks a new CT against
        "structures": {"classes": list(structures), "cases_with_regions": with_regions,
                       "union_only_cases": len(train_cases) - with_regions,
                       "volume_cc": structure_volume_range(train_cache)} if structures else {},
    }
    epoch_times = []
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        plan = epoch_plan(len(visits) * config.patches_per_case, epoch, config.seed, config.batch_size,
                          dist.world_size, dist.rank)
        plan = [[(visits[i % len(visits)], s) for i, s in batch] for batch in plan]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=collate,
                                             num_workers=config.num_workers)
        losses = []
        bar = tqdm(loader, total=len(plan), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show,
                   file=sys.stderr, leave=False)
        for batch in bar:
            soft = batch["soft"].to(device) if config.soft_labels else None
            classes = batch["classes"].to(device) if structures else None
            losses.append(train_step(batch["image"].to(device), batch["label"].to(device), batch["prompt"],
                                     batch["emphasis"].to(device), soft, classes))
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            for cb in callbacks:
                cb("step", {"epoch": epoch + 1, "step": step, "loss": losses[-1]})
        bar.close()
        train_loss = dist.mean(float(np.mean(losses)), device)

        record = {"epoch": epoch + 1, "step": step, "train_loss": round(train_loss, 6),
                  "lr": optimizer.param_groups[0]["lr"], "val_dice": None}
        if dist.is_main:
            last_epoch = epoch + 1 == config.epochs
            if val_cache is not None and ((epoch + 1) % config.val_every == 0 or last_epoch):
                record["val_dice"] = round(validate(model, val_cache, patch, config.val_overlap, device, config.amp), 6)
            improved = record["val_dice"] is not None and (best["val_dice"] is None
                                                           or record["val_dice"] > best["val_dice"])
            if improved:
                best = {"val_dice": record["val_dice"], "epoch": epoch + 1}
            record["best_val_dice"] = best["val_dice"]
            epoch_times.append(time.perf_counter() - t0)
            record["seconds"] = round(epoch_times[-1], 3)

            def bundle(kind: str) -> ModelBundle:
                summary = {**training_summary, "epochs": epoch + 1, "of_epochs": config.epochs, "selected": kind,
                           "best_val_dice": best["val_dice"], "best_epoch": best["epoch"],
                           "train_loss": record["train_loss"]}
                return ModelBundle.from_models(
                    network, text, preprocessing=preprocessing,
                    inference=InferenceConfig(roi_size=patch, overlap=0.5), name=config.name,
                    version=config.version, training=summary)

            if improved or (val_cache is None):  # without validation cases, "best" is the latest
                bundle("best").save(out / "best")
            bundle("last").save(out / "last")
            history = [r for r in history if r["epoch"] < epoch + 1] + [record]
            save_checkpoint(out / CHECKPOINT_NAME, {
                "format": CHECKPOINT_FORMAT, "config": config.to_dict(), "epoch": epoch + 1, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": train_step.scaler.state_dict(), "rng": rng_state(), "best": best, "history": history,
                "manifest_hash": m_hash, "world_size": dist.world_size, "global_batch": global_batch,
                "text_fingerprint": text.spec.fingerprint,
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            write_logs(out, history)
            if show:
                val = "" if record["val_dice"] is None else f", val Dice {record['val_dice']:.4f}"
                print(f"epoch {epoch + 1}/{config.epochs}: loss {train_loss:.4f}{val} ({record['seconds']:.1f} s)",
                      file=sys.stderr)
        dist.barrier()
        for cb in callbacks:
            cb("epoch", record)

    return TrainResult(out, out / "best", out / "last", max(config.epochs, start_epoch), best["val_dice"],
                       best["epoch"], history, float(np.mean(epoch_times)) if epoch_times else 0.0)
