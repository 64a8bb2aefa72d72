#!/usr/bin/env python3
"""How much of the training's nodal over-weighting to undo at inference, chosen on validation cases.

Usage: ``python3 bench/loss_weight_correction.py [--bundle Resources/Models/demo]
[--manifest data/phantoms/manifest.csv] [--split val] [--factors 1 2 3 4 5 6] [--thresholds 0.5 ...]
[--choose-by nodal|ctv|structures] [--save] [--version V] [--json]``.

``mmcontour train --region-weight W`` weighs the voxels of the nodal levels 1 + W times the rest, so that the
note's N stage decides them. Where the network cannot tell whether a voxel is just inside a level or just
outside, that weighting makes it answer "inside" once the voxel is inside one time in 2 + W: the levels come
out too large (v11 drew level 4 at 40-64 cc against 21-29 cc in training). ``inference.contourer.undo_loss_weights``
divides a structure's probability by a factor and renormalises; 1 + W undoes the cross-entropy's weighting
exactly, but the Dice term and under-drawn thin levels (the internal mammary nodes) argue for less.

Each case of the split is run through the network once (``Contourer.probabilities``); every factor is then
applied to the same probabilities (``Contourer.from_probabilities``) and scored against the case's guideline
truth: clinical accuracy (``training.evaluate.clinical_check``), whole-CTV Dice, and the Dice of each nodal
structure. The factor chosen is the one with the highest mean nodal-structure Dice among those that make no
contour clinically wrong that factor 1 (no correction) got right. ``--save`` writes it into the bundle
(``inference.loss_weight_correction``, one entry per nodal structure, with how it was chosen); ``--version``
also sets the bundle's version. Choose on validation cases, never on the test set.

``--thresholds``: the same for the probability at which the whole CTV is cut (``inference.threshold``, 0.5 by
default). The Dice term of the training loss pays for a voxel once its CTV fraction is above half the Dice
the network reaches, so a network that is unsure of a border draws it outside the truth; a higher threshold
takes that back. Every (factor, threshold) pair is scored on the same network pass; ``--choose-by`` says
which mean Dice decides (nodal structures, the whole CTV, or every structure), among the pairs that lose no
contour that (1, the bundle's threshold) got right. ``--save`` also writes the threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def nodal_structures(classes) -> list[str]:
    """The bundle's nodal levels (what region-weighted training emphasises by default)."""
    from MMContourLib.note.targets import is_nodal_structure

    return [name for name in classes if is_nodal_structure(name)]


def score_factors(contourer, cases, factors, progress=None, thresholds=None) -> dict:
    """{(factor, threshold): [one row per case]} for each factor applied to every nodal structure of the bundle
    and each whole-CTV threshold (default: the bundle's)."""
    from MMContourLib.image.grid import on_grid
    from MMContourLib.image.readwrite import read_image
    from MMContourLib.inference.contourer import check_loss_weights
    from MMContourLib.training.evaluate import clinical_check, region_coverage, segmentation_metrics, structure_dice

    classes = tuple(contourer.network.config.structures or ())
    nodal = nodal_structures(classes)
    own_threshold, own_weights = contourer.bundle.inference.threshold, contourer.loss_weights
    weights = {f: check_loss_weights({name: f for name in nodal} if f != 1 else {}, classes) for f in factors}
    rows = {(f, t): [] for f in factors for t in (thresholds or [own_threshold])}
    try:
        for i, case in enumerate(cases):
            ct = read_image(case.ct)
            regions = on_grid(read_image(case.regions), ct)
            truth = on_grid(read_image(case.ctv), ct)
            model_input = contourer.prepare(ct)
            prob, windows = contourer.probabilities(model_input, contourer.encode_notes([case.note]))
            for f, t in rows:
                contourer.loss_weights, contourer.bundle.inference.threshold = weights[f], t
                result = contourer.from_probabilities(ct, model_input, case.note, prob, windows)
                check = clinical_check(region_coverage(result.mask, regions), case.note)
                dice, _ = structure_dice(result.labels, classes, regions, case.note)
                rows[f, t].append({"case_id": case.case_id, "prompt": case.prompt, "correct": bool(check["correct"]),
                                   "missing": check["missing"], "extra": check["extra"],
                                   "dice": segmentation_metrics(result.mask, truth)["dice"],
                                   "structure_dice": float(np.mean(list(dice.values()))) if dice else None,
                                   "nodal_dice": {k: v for k, v in dice.items() if k in nodal},
                                   "nodal_cc": {k: round(v, 1) for k, v in result.structure_volumes().items()
                                                if k in nodal and v > 0}})
            if progress:
                progress(i + 1, len(cases))
    finally:  # the contourer draws with the bundle's own settings again
        contourer.loss_weights, contourer.bundle.inference.threshold = own_weights, own_threshold
    return rows


def summarise(rows: dict) -> dict:
    """Per (factor, threshold): cases right, whole-CTV Dice, Dice of every structure (mean per case, then over
    cases), nodal-structure Dice (mean over the structure-case pairs scored), per nodal structure, and the cases
    the first pair (factor 1, the bundle's threshold) got right that this pair gets wrong."""
    base = next(iter(rows.values()))
    out = {}
    for f, rs in rows.items():
        pairs = [d for r in rs for d in r["nodal_dice"].values()]
        per = {}
        for r in rs:
            for k, d in r["nodal_dice"].items():
                per.setdefault(k, []).append(d)
        out[f] = {"correct": sum(r["correct"] for r in rs), "cases": len(rs),
                  "ctv_dice": float(np.mean([r["dice"] for r in rs])),
                  "structure_dice": float(np.mean([r["structure_dice"] for r in rs if r["structure_dice"] is not None])),
                  "nodal_dice": float(np.mean(pairs)) if pairs else None,
                  "per_structure": {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())},
                  "lost": [r["case_id"] for r, b in zip(rs, base) if b["correct"] and not r["correct"]]}
    return out


CRITERIA = {"nodal": "nodal_dice", "ctv": "ctv_dice", "structures": "structure_dice"}


def choose(summary: dict, by: str = "nodal") -> tuple[float, float]:
    """The (factor, threshold) with the highest mean Dice of ``by`` (CRITERIA) among those that lose no right
    contour; ties go to the smaller correction, then the threshold nearer the first pair's."""
    key, first = CRITERIA[by], next(iter(summary))
    safe = [k for k, s in summary.items() if not s["lost"] and s[key] is not None]
    if not safe:
        return first
    return max(safe, key=lambda k: (summary[k][key], -k[0], -abs(k[1] - first[1])))


def save(bundle_path, factor: float, nodal, provenance: dict, version: str | None = None,
         threshold: float | None = None) -> None:
    from MMContourLib.model.bundle import ModelBundle

    bundle = ModelBundle.load(bundle_path)
    bundle.inference.loss_weight_correction = {name: factor for name in nodal} if factor != 1 else {}
    if threshold is not None:
        bundle.inference.threshold = float(threshold)
    bundle.training = {**bundle.training, "loss_weight_correction": provenance}
    if version:
        bundle.version = version
    bundle.save(bundle_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "Resources" / "Models" / "demo"))
    ap.add_argument("--manifest", default=str(ROOT / "data" / "phantoms" / "manifest.csv"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--thresholds", type=float, nargs="+",
                    help="whole-CTV probability thresholds to try (default: the bundle's own)")
    ap.add_argument("--choose-by", choices=sorted(CRITERIA), default="nodal",
                    help="which mean Dice decides: nodal structures (default), the whole CTV, or every structure")
    ap.add_argument("--save", action="store_true", help="write the chosen factor (and threshold) into the bundle")
    ap.add_argument("--version", help="with --save: the bundle's new version")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="also print every case as JSON")
    args = ap.parse_args(argv)
    if any(f < 1 for f in args.factors):
        ap.error("factors must be >= 1")
    factors = sorted(set([1.0] + list(args.factors)))
    if args.thresholds and not all(0 < t < 1 for t in args.thresholds):
        ap.error("thresholds must be between 0 and 1")

    import torch

    from MMContourLib.data.manifest import read_cases
    from MMContourLib.inference.contourer import Contourer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    contourer = Contourer.from_bundle(args.bundle, device="cpu")
    classes = tuple(contourer.network.config.structures or ())
    if not classes:
        ap.error("a single-CTV bundle has no structures to correct")
    cases = [c for c in read_cases(args.manifest, split=args.split) if c.regions]
    own = contourer.bundle.inference.threshold
    thresholds = [own] + sorted(set(args.thresholds or []) - {own})  # the bundle's own first: the reference pair
    rows = score_factors(contourer, cases, factors, thresholds=thresholds,
                         progress=lambda d, n: print(f"\r{d}/{n} cases", end="\n" if d == n else "", file=sys.stderr, flush=True))
    summary = summarise(rows)
    chosen = choose(summary, args.choose_by)
    name = lambda k: f"{k[0]:g} @ {k[1]:g}"  # noqa: E731
    print(f"bundle {args.bundle}; {args.manifest} split {args.split}: {len(cases)} cases; {time.perf_counter() - t0:.0f} s; "
          f"chosen by {args.choose_by} Dice")
    print(f"{'factor @ threshold':>18} {'right':>7} {'CTV Dice':>9} {'structures':>11} {'nodal Dice':>11}  "
          f"right at {name((1.0, own))}, wrong here")
    for k, s in summary.items():
        print(f"{name(k):>18} {s['correct']:>3}/{s['cases']:<3} {s['ctv_dice']:>9.3f} {s['structure_dice']:>11.3f} "
              f"{s['nodal_dice'] or float('nan'):>11.3f}  {', '.join(s['lost']) or '-'}"
              f"{'   <- chosen' if k == chosen else ''}")
    print("per nodal structure (mean Dice):")
    for k in summary[chosen]["per_structure"]:
        print(f"  {k:12} " + "  ".join(f"{name(p)}: {summary[p]['per_structure'].get(k, float('nan')):.3f}" for p in summary))
    if args.save:
        provenance = {"by": "bench/loss_weight_correction.py", "manifest": Path(args.manifest).name, "split": args.split,
                      "cases": len(cases), "factors": factors, "thresholds": thresholds, "chosen_by": args.choose_by,
                      "chosen": chosen[0], "chosen_threshold": chosen[1],
                      "dice": {name(k): {c: round(s[v], 4) for c, v in CRITERIA.items() if s[v] is not None}
                               for k, s in summary.items()}}
        save(args.bundle, chosen[0], nodal_structures(classes), provenance, args.version, threshold=chosen[1])
        print(f"saved factor {chosen[0]:g} and threshold {chosen[1]:g} in {args.bundle} "
              "(inference.loss_weight_correction, inference.threshold)")
    if args.json:
        print(json.dumps({"summary": {name(k): v for k, v in summary.items()}, "chosen": list(chosen),
                          "rows": {name(k): v for k, v in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
