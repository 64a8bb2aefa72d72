#!/usr/bin/env python3
"""How well the review flags (``inference/review.py``) separate clinically wrong contours from right ones.

Usage: ``python3 bench/review_flags.py [--n 30] [--seed 7] [--bundle Resources/Models/demo]
[--calibrate 20] [--training-range 96] [--json]``.

Cases are the phantoms of ``mmcontour phantom --n N --seed S`` (all splits) and of the same with
``--external``, made in memory. Each is contoured with the bundle; a contour is clinically wrong when
``training.evaluate.clinical_check`` on its ``region_coverage`` says so (the regions it covers by more
than half are not exactly the note's). Printed per set: wrong contours flagged (sensitivity) and
right contours flagged (false-flag rate), in total and per kind of flag, with the issue 11 target
(>= 90 % of wrong ones flagged, <= 20 % of right ones).

Per-structure bundles add per-structure flags (kind "note": the note's guideline and the structures
drawn disagree; "confidence" naming a structure: ``inference.review.structure_confidence_reasons``) to
each contour's review; the ``whole`` rows count only the flags that name no structure, so the table
shows what the per-structure flags add. They are also measured per structure: each structure present
in the guideline truth or the contour (``training.evaluate.structure_dice``) is wrong when its Dice is
below ``--structure-dice`` (default 0.5) and right otherwise; crumbs (drawn <= ``ReviewConfig.max_excluded_cc``
where the truth has none: clinically nothing, and never flagged by design) are counted apart, neither
right nor wrong; a structure is flagged when a reason names it. A single-CTV bundle has no per-structure rows
(the output says so).

``--calibrate K``: first contour K internal phantoms of another seed (``--calibration-seed``) and
print, for information, the uncertain-voxel ratio that alone would flag at most ``--budget`` of their right
contours, and for a per-structure bundle the per-structure ratio (``review.measures["structure_confidence"]``)
that alone would flag at most that share of the right structures of more than ``min_confidence_cc``. The
budget is the whole review's, so it then prints the thresholds
calibrated jointly (``calibrate_jointly``): the checks without a threshold (note, range, input) spend
their share first and the two confidence flags get the rest. ``--save`` writes the joint pair into the
bundle (``config.json`` ``inference.review``, with how it was found), where ``ReviewConfig.for_bundle``
reads it: thresholds belong to the model they were calibrated on. Without ``--save`` the flags are
measured with the bundle's own thresholds (or the defaults).
``--training-range M``: a bundle trained before the range was recorded (the shipped demo) has no
input flag; this rebuilds its range from the first M training-split phantoms of its own training
set (``mmcontour phantom --n 160 --seed 0``) and reviews again with it (the ``+range`` rows).
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

from MMContourLib.training.review_calibration import calibrate_jointly, share_text as _pct, thresholds_text  # noqa: E402


def phantom_config(external: bool = False, planning_fov: bool = True):
    """The phantoms of ``mmcontour phantom [--external] [--planning-fov]`` (the shipped bundle's: planning FOV)."""
    from dataclasses import replace

    from MMContourLib.data.phantom import PhantomConfig

    cfg = PhantomConfig.external_site() if external else PhantomConfig()
    return replace(cfg, planning_fov=planning_fov)


def phantom_cases(n: int, seed: int, external: bool, planning_fov: bool = True):
    """The cases ``mmcontour phantom --n n --seed seed [--external] [--planning-fov]`` writes, one at a time."""
    from MMContourLib.data.phantom import generate_case
    from MMContourLib.data.phantom_dataset import case_seed

    cfg = phantom_config(external, planning_fov)
    for i in range(n):
        yield generate_case(case_seed(seed, i), cfg, case_id=f"p{seed}-{i:04d}")


def demo_training_range(m: int, n_total: int = 160, seed: int = 0, planning_fov: bool = True) -> dict:
    """``training_range`` of the first ``m`` training-split cases of ``mmcontour phantom --n 160 --seed 0``."""
    from MMContourLib.data.phantom import generate_case, sample_note
    from MMContourLib.data.phantom_dataset import _assign_splits, case_seed
    from MMContourLib.image.ctstats import ct_statistics, training_range

    cfg = phantom_config(False, planning_fov)
    seeds = [case_seed(seed, i) for i in range(n_total)]
    notes = [sample_note(s, cfg) for s in seeds]
    splits = _assign_splits(notes, (0.6, 0.2, 0.2), seed)
    chosen = [i for i, s in enumerate(splits) if s == "train"][:m]
    return training_range(ct_statistics(generate_case(seeds[i], cfg, note=notes[i]).ct) for i in chosen)


def structure_rows(result, case, config, dice_threshold: float, drawn: dict) -> list[dict]:
    """Per structure of a per-structure contour: Dice against the note's guideline truth, wrong or not,
    flagged or not (by which kinds); [] for a single-CTV bundle."""
    from MMContourLib.note.targets import structure_label_map
    from MMContourLib.training.evaluate import structure_dice

    if getattr(result, "labels", None) is None:
        return []
    import SimpleITK as sitk

    classes = tuple(result.classes)
    dice, _ = structure_dice(result.labels, classes, case.regions, case.note)
    truth = structure_label_map(sitk.GetArrayFromImage(case.regions), case.note, classes)
    truth_voxels = np.bincount(truth.ravel(), minlength=256)
    voxel_cc = float(np.prod(case.regions.GetSpacing())) / 1000.0
    kinds: dict[str, set] = {}
    for r in result.review.reasons:
        if r.structure:
            kinds.setdefault(r.structure, set()).add(r.kind)
    rows = []
    for name, d in dice.items():
        truth_cc = float(truth_voxels[classes.index(name) + 1]) * voxel_cc
        crumb = truth_cc == 0 and drawn.get(name, 0.0) <= config.max_excluded_cc
        rows.append({"case_id": case.case_id, "structure": name, "dice": round(d, 4), "drawn_cc": drawn.get(name, 0.0),
                     "truth_cc": round(truth_cc, 2), "crumb": crumb, "correct": bool(d >= dice_threshold),
                     "kinds": sorted(kinds.get(name, ()))})
    return rows


def run_set(contourer, cases, with_range: dict | None, dice_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(one row per contour, one row per structure of per-structure contours)."""
    from MMContourLib.inference.review import review_contour
    from MMContourLib.training.review_calibration import contour_row

    config = contourer.review_config  # the defaults with the bundle's own calibrated thresholds
    rows, per_structure = [], []
    for case in cases:
        result = contourer.contour(case.ct, case.note)
        row = contour_row(result, case.case_id, case.note, case.regions)
        reasons = result.review.reasons
        if with_range is not None:
            training = {**contourer.bundle.training, "ct_range": with_range}
            again = review_contour(case.ct, result.probability, result.mask, case.note, training,
                                   contourer.bundle.preprocessing, config)
            structure_reasons = [r for r in reasons if r.structure]  # the contourer's, unchanged by the range
            row["kinds_with_range"] = sorted({r.kind for r in list(again.reasons) + structure_reasons})
            row["reasons_with_range"] = again.to_dict()["reasons"] + [r.line() for r in structure_reasons]
        rows.append(row)
        per_structure += structure_rows(result, case, config, dice_threshold, row["drawn_cc"])
    return rows, per_structure


def rates(rows: list[dict], key: str = "kinds", kind: str | None = None) -> dict:
    flagged = (lambda r: kind in r[key]) if kind else (lambda r: bool(r[key]))
    wrong = [r for r in rows if not r["correct"]]
    right = [r for r in rows if r["correct"]]
    out = {"cases": len(rows), "wrong": len(wrong), "wrong_flagged": sum(map(flagged, wrong)),
           "right": len(right), "right_flagged": sum(map(flagged, right))}
    out["sensitivity"] = out["wrong_flagged"] / out["wrong"] if out["wrong"] else None
    out["false_flag_rate"] = out["right_flagged"] / out["right"] if out["right"] else None
    return out


def meets_target(r: dict, sensitivity: float = 0.9, false_flags: float = 0.2) -> str:
    if r["sensitivity"] is None or r["false_flag_rate"] is None:
        return "n/a (no wrong or no right ones)"
    ok = r["sensitivity"] >= sensitivity and r["false_flag_rate"] <= false_flags
    return "met" if ok else "not met"


def calibrate(rows: list[dict], false_flag_budget: float = 0.2) -> float | None:
    right = sorted(r["uncertain_ratio"] for r in rows if r["correct"] and r["uncertain_ratio"] is not None)
    return float(np.quantile(right, 1 - false_flag_budget)) if right else None


def calibrate_structures(rows: list[dict], per_structure: list[dict], false_flag_budget: float = 0.2) -> dict:
    """The per-structure uncertain ratio flagging at most ``false_flag_budget`` of the right structures
    larger than ``min_confidence_cc``, and the ratios of right and wrong ones."""
    from MMContourLib.inference.review import ReviewConfig

    min_cc = ReviewConfig().min_confidence_cc
    measures = {r["case_id"]: r.get("structure_confidence") or {} for r in rows}
    right, wrong = [], []
    for s in per_structure:
        m = measures.get(s["case_id"], {}).get(s["structure"])
        if m and m.get("uncertain_ratio") is not None and m["volume_cc"] > min_cc:
            (right if s["correct"] else wrong).append(m["uncertain_ratio"])
    return {"suggested": float(np.quantile(right, 1 - false_flag_budget)) if right else None,
            "right_ratios": sorted(right), "wrong_ratios": sorted(wrong),
            "available": any(measures.values())}


def save_thresholds(bundle_path, joint: dict, seed: int, cases: int):
    """Write ``calibrate_jointly``'s thresholds into the bundle (``InferenceConfig.review``) with how they were
    found; the bundle is saved again as a whole (atomically, read back). Returns the ReviewConfig they give."""
    from MMContourLib.inference.review import ReviewConfig
    from MMContourLib.model.bundle import ModelBundle
    from MMContourLib.training.review_calibration import with_thresholds

    try:
        bundle = with_thresholds(ModelBundle.load(bundle_path), joint, {
            "by": "bench/review_flags.py --calibrate", "phantoms": f"mmcontour phantom --n {cases} --seed {seed} --planning-fov"})
    except ValueError as exc:
        raise SystemExit(f"review_flags: {exc}") from None
    bundle.save(bundle_path)
    return ReviewConfig.for_bundle(bundle.inference.review)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "Resources" / "Models" / "demo"))
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--calibrate", type=int, default=0, metavar="K")
    ap.add_argument("--calibration-seed", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.2,
                    help="with --calibrate: the share of right calibration contours the whole review may flag "
                         "(default 0.2, issue 11's target; lower leaves room for the noise of K phantoms)")
    ap.add_argument("--save", action="store_true",
                    help="with --calibrate: write the jointly calibrated thresholds into the bundle "
                         "(config.json inference.review) and measure with them")
    ap.add_argument("--training-range", type=int, default=0, metavar="M")
    ap.add_argument("--structure-dice", type=float, default=0.5,
                    help="a structure with a lower Dice against its guideline truth is wrong (default 0.5)")
    ap.add_argument("--thorax-fov", action="store_true",
                    help="phantoms whose field of view ends at the thorax (bundles trained before planning-CT phantoms)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="also print every case as JSON")
    args = ap.parse_args(argv)

    import torch

    from MMContourLib.inference.contourer import Contourer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    contourer = Contourer.from_bundle(args.bundle, device=args.device)
    per_structure_bundle = bool(getattr(contourer.network.config, "structures", ()))
    if args.save and not args.calibrate:
        ap.error("--save writes what --calibrate K finds: give --calibrate")
    if not 0.0 <= args.budget < 1.0:
        ap.error(f"--budget must lie in [0, 1), got {args.budget}")
    report: dict = {"bundle": args.bundle, "per_structure_bundle": per_structure_bundle,
                    "structure_dice": args.structure_dice}
    if args.calibrate:
        rows, structures = run_set(contourer, phantom_cases(args.calibrate, args.calibration_seed, False,
                                                                 not args.thorax_fov), None,
                                   args.structure_dice)
        right = [r["uncertain_ratio"] for r in rows if r["correct"]]
        wrong = [r["uncertain_ratio"] for r in rows if not r["correct"]]
        report["calibration"] = {"seed": args.calibration_seed, "cases": len(rows),
                                 "suggested": calibrate(rows, args.budget),
                                 "right_ratios": sorted(x for x in right if x is not None),
                                 "wrong_ratios": sorted(x for x in wrong if x is not None)}
        print(f"calibration (internal, seed {args.calibration_seed}, {len(rows)} cases: {len(right)} right, "
              f"{len(wrong)} wrong). For information, each threshold alone at the {100 * args.budget:g} % budget "
              "(the 'jointly' line below is what --save writes): whole-contour uncertain ratio "
              f"{report['calibration']['suggested']}")
        print(f"  right: {[round(x, 3) for x in report['calibration']['right_ratios']]}")
        print(f"  wrong: {[round(x, 3) for x in report['calibration']['wrong_ratios']]}")
        if per_structure_bundle:
            cal = calibrate_structures(rows, structures, args.budget)
            report["calibration"]["structures"] = cal
            if not cal["available"]:
                print("  per structure: the review has no measures['structure_confidence'] (the contourer does not "
                      "pass the per-structure probabilities yet): no per-structure calibration")
            else:
                print(f"  per structure (> {contourer.review_config.min_confidence_cc:g} cc; {len(cal['right_ratios'])} right, "
                      f"{len(cal['wrong_ratios'])} wrong): uncertain ratio {cal['suggested']} (bundles with "
                      "left-out references judge structures by those instead)")
                print(f"    right: {[round(x, 3) for x in cal['right_ratios']]}")
                print(f"    wrong: {[round(x, 3) for x in cal['wrong_ratios']]}")
        if args.json:  # every calibration contour, to calibrate again (another budget) without contouring again
            report["calibration"]["rows"], report["calibration"]["structure_rows"] = rows, structures
        joint = calibrate_jointly(rows, args.budget)
        report["calibration"]["joint"] = joint
        print(f"  jointly (the whole review within the {100 * args.budget:g} % budget; {joint.get('right_flagged_without_threshold')} of "
              f"{joint.get('right')} right contours flagged by checks without a threshold): share {joint['share']}, "
              f"{thresholds_text(joint)} ({joint.get('right_flagged')} right flagged)")
        if joint.get("left_out_reference"):
            print("  left-out references (median left-out voxels per structure voxel of right structures; cases, "
                  "from): " + ", ".join(f"{n} {v:g} ({joint['reference_cases'][n]['cases']}, "
                                        f"{joint['reference_cases'][n]['from']})"
                                        for n, v in joint["left_out_reference"].items()))
        if args.save:
            contourer.review_config = save_thresholds(args.bundle, joint, args.calibration_seed, len(rows))
            print(f"  saved in {args.bundle} (inference.review); measuring with them")
    config = contourer.review_config
    report["max_uncertain_ratio"] = config.max_uncertain_ratio
    report["max_structure_uncertain_ratio"] = config.max_structure_uncertain_ratio
    report["max_left_out_factor"] = config.max_left_out_factor
    report["left_out_reference"] = config.left_out_reference
    with_range = demo_training_range(args.training_range, planning_fov=not args.thorax_fov) if args.training_range else None
    if with_range:
        report["training_range"] = with_range
    sets = {}
    kinds = ("input", "confidence", "volume", "anatomical-range", "note")
    for name, external in (("internal", False), ("external", True)):
        rows, structures = run_set(contourer, phantom_cases(args.n, args.seed, external, not args.thorax_fov), with_range,
                                   args.structure_dice)
        s = {"all": rates(rows), "whole": rates(rows, "kinds_whole"), **{k: rates(rows, kind=k) for k in kinds}}
        if per_structure_bundle:
            s["per-structure"] = rates(rows, "kinds_structure")
        if with_range is not None:
            s["all+range"] = rates(rows, "kinds_with_range")
            s["input+range"] = rates(rows, "kinds_with_range", "input")
        structure_sets = {}
        scored = [r for r in structures if not r["crumb"]]
        if scored:
            structure_sets["structures"] = rates(scored)
            for k in ("note", "confidence"):
                structure_sets[f"structures:{k}"] = rates(scored, kind=k)
        sets[name] = {"contours": s, "structures": structure_sets, "crumbs": len(structures) - len(scored),
                      "rows": rows, "structure_rows": structures}
    report["sets"] = sets
    report["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"bundle {args.bundle}; phantoms --n {args.n} --seed {args.seed}; {thresholds_text(report)}; "
          f"{report['seconds']} s")
    print("sensitivity = wrong flagged / wrong; false-flag rate = right flagged / right; "
          "target: >= 90 % and <= 20 %")
    header = f"{'set':9} {'flags':20} {'sensitivity':>16} {'false-flag rate':>16}  target"
    print(header)
    for name, entry in sets.items():
        for key, r in entry["contours"].items():
            print(f"{name:9} {key:20} {_pct(r['wrong_flagged'], r['wrong']):>16} "
                  f"{_pct(r['right_flagged'], r['right']):>16}  {meets_target(r) if key in ('all', 'all+range') else ''}")
    if per_structure_bundle:
        crumbs = ", ".join(f"{name} {entry['crumbs']}" for name, entry in sets.items())
        print(f"\nper structure (wrong: Dice < {args.structure_dice:g} against the guideline structure; crumbs of "
              f"<= {config.max_excluded_cc:g} cc outside the truth left out: {crumbs})")
        print(header)
        for name, entry in sets.items():
            for key, r in entry["structures"].items():
                print(f"{name:9} {key:20} {_pct(r['wrong_flagged'], r['wrong']):>16} "
                      f"{_pct(r['right_flagged'], r['right']):>16}  {meets_target(r) if key == 'structures' else ''}")
    else:
        print("\nsingle-CTV bundle (one output): no per-structure flags to measure")
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
