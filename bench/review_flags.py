#!/usr/bin/env python3
"""How well the review flags (``inference/review.py``) separate clinically wrong contours from right ones.

Usage: ``python3 bench/review_flags.py [--n 30] [--seed 7] [--bundle Resources/Models/demo]
[--calibrate 20] [--training-range 96] [--json]``.

Cases are the phantoms of ``mmcontour phantom --n N --seed S`` (all splits) and of the same with
``--external``, made in memory. Each is contoured with the bundle; a contour is clinically wrong when
``training.evaluate.clinical_check`` on its ``region_coverage`` says so (the regions it covers by more
than half are not exactly the note's). Printed per set: wrong contours flagged (sensitivity) and
right contours flagged (false-flag rate), in total and per kind of flag.

``--calibrate K``: first contour K internal phantoms of another seed (``--calibration-seed``) and
print the uncertain-voxel ratio that flags at most 20 % of their right contours (issue 11's
false-flag budget): ``ReviewConfig.max_uncertain_ratio`` is that number, rounded.
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


def phantom_cases(n: int, seed: int, external: bool):
    """The cases ``mmcontour phantom --n n --seed seed [--external]`` writes, one at a time."""
    from MMContourLib.data.phantom import PhantomConfig, generate_case
    from MMContourLib.data.phantom_dataset import case_seed

    cfg = PhantomConfig.external_site() if external else PhantomConfig()
    for i in range(n):
        yield generate_case(case_seed(seed, i), cfg, case_id=f"p{seed}-{i:04d}")


def demo_training_range(m: int, n_total: int = 160, seed: int = 0) -> dict:
    """``training_range`` of the first ``m`` training-split cases of ``mmcontour phantom --n 160 --seed 0``."""
    from MMContourLib.data.phantom import PhantomConfig, generate_case, sample_note
    from MMContourLib.data.phantom_dataset import _assign_splits, case_seed
    from MMContourLib.image.ctstats import ct_statistics, training_range

    cfg = PhantomConfig()
    seeds = [case_seed(seed, i) for i in range(n_total)]
    notes = [sample_note(s, cfg) for s in seeds]
    splits = _assign_splits(notes, (0.6, 0.2, 0.2), seed)
    chosen = [i for i, s in enumerate(splits) if s == "train"][:m]
    return training_range(ct_statistics(generate_case(seeds[i], cfg, note=notes[i]).ct) for i in chosen)


def run_set(contourer, cases, with_range: dict | None) -> list[dict]:
    from MMContourLib.inference.review import review_contour
    from MMContourLib.training.evaluate import clinical_check, region_coverage

    rows = []
    for case in cases:
        result = contourer.contour(case.ct, case.note)
        check = clinical_check(region_coverage(result.mask, case.regions), case.note)
        row = {"case_id": case.case_id, "prompt": result.prompt, "correct": bool(check["correct"]),
               "missing": check["missing"], "extra": check["extra"], "volume_cc": round(result.volume_cc, 1),
               **{k: result.review.measures.get(k) for k in ("uncertain_ratio", "uncertain_cc", "uncertain_mm")},
               "kinds": sorted({r.kind for r in result.review.reasons}), "reasons": result.review.to_dict()["reasons"]}
        if with_range is not None:
            training = {**contourer.bundle.training, "ct_range": with_range}
            again = review_contour(case.ct, result.probability, result.mask, case.note, training,
                                   contourer.bundle.preprocessing)
            row["kinds_with_range"] = sorted({r.kind for r in again.reasons})
            row["reasons_with_range"] = again.to_dict()["reasons"]
        rows.append(row)
    return rows


def rates(rows: list[dict], key: str = "kinds", kind: str | None = None) -> dict:
    flagged = (lambda r: kind in r[key]) if kind else (lambda r: bool(r[key]))
    wrong = [r for r in rows if not r["correct"]]
    right = [r for r in rows if r["correct"]]
    return {"cases": len(rows), "wrong": len(wrong), "wrong_flagged": sum(map(flagged, wrong)),
            "right": len(right), "right_flagged": sum(map(flagged, right))}


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f} %)" if b else f"{a}/0"


def calibrate(rows: list[dict], false_flag_budget: float = 0.2) -> float | None:
    right = sorted(r["uncertain_ratio"] for r in rows if r["correct"] and r["uncertain_ratio"] is not None)
    return float(np.quantile(right, 1 - false_flag_budget)) if right else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "Resources" / "Models" / "demo"))
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--calibrate", type=int, default=0, metavar="K")
    ap.add_argument("--calibration-seed", type=int, default=3)
    ap.add_argument("--training-range", type=int, default=0, metavar="M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="also print every case as JSON")
    args = ap.parse_args(argv)

    import torch

    from MMContourLib.inference.contourer import Contourer
    from MMContourLib.inference.review import ReviewConfig

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    contourer = Contourer.from_bundle(args.bundle, device="cpu")
    report: dict = {"bundle": args.bundle, "max_uncertain_ratio": ReviewConfig().max_uncertain_ratio}
    if args.calibrate:
        rows = run_set(contourer, phantom_cases(args.calibrate, args.calibration_seed, False), None)
        right = [r["uncertain_ratio"] for r in rows if r["correct"]]
        wrong = [r["uncertain_ratio"] for r in rows if not r["correct"]]
        report["calibration"] = {"seed": args.calibration_seed, "cases": len(rows), "suggested": calibrate(rows),
                                 "right_ratios": sorted(x for x in right if x is not None),
                                 "wrong_ratios": sorted(x for x in wrong if x is not None)}
        print(f"calibration (internal, seed {args.calibration_seed}, {len(rows)} cases: {len(right)} right, "
              f"{len(wrong)} wrong): uncertain ratio flagging <= 20 % of right contours: "
              f"{report['calibration']['suggested']}")
        print(f"  right: {[round(x, 3) for x in report['calibration']['right_ratios']]}")
        print(f"  wrong: {[round(x, 3) for x in report['calibration']['wrong_ratios']]}")
    with_range = demo_training_range(args.training_range) if args.training_range else None
    if with_range:
        report["training_range"] = with_range
    sets = {}
    for name, external in (("internal", False), ("external", True)):
        rows = run_set(contourer, phantom_cases(args.n, args.seed, external), with_range)
        sets[name] = {"all": rates(rows), **{k: rates(rows, kind=k) for k in ("input", "confidence", "volume")}}
        if with_range is not None:
            sets[name]["all+range"] = rates(rows, "kinds_with_range")
            sets[name]["input+range"] = rates(rows, "kinds_with_range", "input")
        sets[name]["rows"] = rows
    report["sets"] = sets
    report["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"bundle {args.bundle}; phantoms --n {args.n} --seed {args.seed}; max_uncertain_ratio "
          f"{report['max_uncertain_ratio']}; {report['seconds']} s")
    print(f"{'set':9} {'flags':12} {'wrong flagged':>16} {'right flagged':>16}")
    for name, s in sets.items():
        for key, r in s.items():
            if key != "rows":
                print(f"{name:9} {key:12} {_pct(r['wrong_flagged'], r['wrong']):>16} "
                      f"{_pct(r['right_flagged'], r['right']):>16}")
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
