"""``mmcontour train``: a manifest -> a model bundle (``training.train.train``); torchrun starts one process per
GPU with ``-m MMContourLib.cli train ...``."""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.sources import MINILM_SOURCE, SMOLLM2_SOURCE
from ..note.clinical import PROMPT_TEMPLATE_VERSION, PROMPT_TEMPLATES
from ..training.config import DEFAULT_EMPHASIS_LABELS, TEXT_ENCODER_KINDS

if TYPE_CHECKING:
    from ..training.train import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model bundle from a manifest of CTs, CTVs and clinical notes",
                              description="Train a bundle. Writes OUT/best, OUT/last (bundles), OUT/checkpoint.pt, "
                                          "OUT/log.csv, OUT/log.json and OUT/loss_curve.png. Multi-GPU: "
                                          "torchrun --nproc_per_node N -m MMContourLib.cli train ...")
    p.add_argument("--manifest", required=True, help="CSV: case_id, ct, ctv, split, note columns (paths relative to it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (from the start if it has none yet); "
                        "unset options keep the run's values")
    t = p.add_argument_group("text encoder")
    t.add_argument("--text-encoder", choices=list(TEXT_ENCODER_KINDS),
                   help="llm: prompt-tuned causal LLM (default); encoder: bidirectional text tower; none: vision-only")
    t.add_argument("--llm", help=f"LLM / encoder location: folder, .gguf file or pkg:... "
                                 f"(default {SMOLLM2_SOURCE}; encoder {MINILM_SOURCE})")
    t.add_argument("--num-prompt-sets", type=int, help="N sets of prompt vectors (default 2)")
    t.add_argument("--num-prompt-vectors", type=int, help="M vectors per set (default 8)")
    t.add_argument("--prompt-template", choices=list(PROMPT_TEMPLATES),
                   help=f"how the LLM reads a note (default {PROMPT_TEMPLATE_VERSION}: each side of a bilateral note "
                        "on its own; table5-v1: the whole note in one pass, as the paper and bundles up to v10)")
    t.add_argument("--dtype", help="LLM dtype: auto | bf16 | fp16 | fp32")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute LLM activations in backward (less memory for 7B models)")
    t.add_argument("--allow-download", action="store_true", default=None, help="let --llm name a hub id")
    m = p.add_argument_group("model and data")
    m.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute U-Net activations in backward (less GPU memory for large patches)")
    m.add_argument("--feature-size", type=int, help="U-Net width f (channels f, f, 2f, 4f, 8f; paper 48)")
    m.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="model grid mm (paper 1 1 3)")
    m.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="patch voxels (paper 384 384 128)")
    m.add_argument("--fraction", type=float, help="train on this fraction of the training split (data efficiency)")
    m.add_argument("--patches-per-case", type=int, help="patches from each training case per epoch (default 1)")
    m.add_argument("--region-weight", type=float,
                   help="extra loss weight w on voxels of the emphasised sub-regions (weight 1 + w; default 0 = "
                        "plain Dice + CE). Needs the manifest's 'regions' label maps. The emphasised structures "
                        "come out too large where the network is unsure: choose how much of the weight to undo "
                        "at inference on validation cases (bench/loss_weight_correction.py --save), or grow the "
                        "weighted regions with --emphasis-margin")
    m.add_argument("--emphasis-margin", type=float, metavar="MM", dest="emphasis_margin_mm",
                   help="grow the regions --region-weight emphasises by this much, so the weight does not step at "
                        "the structures' borders, where it makes them too large (default 0: at the borders)")
    m.add_argument("--soft-labels", action="store_true", default=None,
                   help="train on partial-volume targets (the fraction of each model-grid voxel inside the CTV) "
                        "instead of 0/1: thin structures survive a coarse grid (losses.py)")
    m.add_argument("--class-balance", type=float, metavar="B",
                   help="per-structure networks: add B x a class-balanced cross-entropy (every structure present "
                        "weighs as much as the largest; pulls small levels out of the background; default 0)")
    m.add_argument("--shift-margin", type=float, metavar="MM", dest="shift_margin_mm",
                   help="air added at the training CTs' sides before patches are drawn, so the body sits at varying "
                        "distances from a patch's edges and the network does not learn the field of view "
                        "(default 60 mm; 0: none, as bundles up to v6 were trained)")
    m.add_argument("--oversample", nargs="+", metavar="COLUMN=VALUE:K",
                   help="visit the training cases whose manifest COLUMN is VALUE K times per epoch (rare kinds of "
                        "case), e.g. side=both:4 for bilateral notes")
    m.add_argument("--structures", choices=("auto", "regions", "union"),
                   help="regions: one output per ESTRO structure (CTVp_Breast, CTVn_L1, ...), learned from the "
                        "regions maps (cases without one teach the whole CTV); union: one CTV output; "
                        "auto (default): regions when the training cases have regions maps")
    m.add_argument("--emphasis-labels", type=int, nargs="+", metavar="LABEL",
                   help="label values in the regions maps that --region-weight emphasises "
                        f"(default {' '.join(map(str, DEFAULT_EMPHASIS_LABELS))}: the phantoms' nodal levels)")
    m.add_argument("--init", metavar="BUNDLE",
                   help="start from this bundle's weights (fine-tuning it, e.g. on your own data): same network, "
                        "structures and text model")
    m.add_argument("--train-split", help="manifest split to train on (default train)")
    m.add_argument("--val-split", help="manifest split to validate on (default val)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="per process (paper 2)")
    o.add_argument("--epochs", type=int, help="paper 100")
    o.add_argument("--lr", type=float, help="AdamW learning rate (paper 1e-4)")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-epochs", type=float, help="linear warmup before the cosine decay (paper 10)")
    o.add_argument("--val-every", type=int, help="validate every k epochs (and at the last)")
    o.add_argument("--seed", type=int)
    o.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on CUDA")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--num-workers", type=int, help="data-loader worker processes")
    r.add_argument("--cache-rate", type=float, help="fraction of training cases kept in memory on the model grid")
    r.add_argument("--name", help="bundle name")
    r.add_argument("--version", dest="bundle_version", help="bundle version")
    r.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def config_from_args(args) -> tuple[TrainConfig, bool]:
    """Unset options come from the checkpoint when resuming, else from the defaults."""
    from ..training.train import CHECKPOINT_NAME, TrainConfig, load_checkpoint

    given = {k: v for k, v in vars(args).items() if v is not None}
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in given.items() if k in names}
    if "bundle_version" in given:
        values["version"] = given["bundle_version"]
    values["manifest"], values["out"] = str(args.manifest), str(args.out)
    values["progress"] = not args.json
    base = {}
    checkpoint = Path(args.out) / CHECKPOINT_NAME
    if args.resume and checkpoint.exists():
        base = load_checkpoint(checkpoint)["config"]
    return TrainConfig.from_dict({**base, **values}), args.resume


def run(args) -> dict | None:
    from ..training.train import train

    config, resume = config_from_args(args)
    result = train(config, resume=resume)
    summary = result.summary()
    if not args.json and int(os.environ.get("RANK", "0")) == 0:
        best = "" if result.best_val_dice is None else f", best val Dice {result.best_val_dice:.4f} (epoch {result.best_epoch})"
        print(f"trained {result.epochs} epochs{best} -> {result.best}, {result.last}")
    return summary if int(os.environ.get("RANK", "0")) == 0 else None
