"""``mmcontour phantom``: a synthetic dataset (``data.phantom_dataset.write_dataset``) and its summary."""
from __future__ import annotations

import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom", help="write synthetic breast CTs, CTVs, sub-region labels and manifest.csv",
        description="Synthetic planning CTs (HU) with clinical notes and guideline CTVs (target rules: docs/method.md). "
                    "Writes DIR/cases/*_ct.nii.gz, *_ctv.nii.gz, *_regions.nii.gz, DIR/manifest.csv, DIR/phantom.json.")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--external", action="store_true",
                   help="an 'external site': other scanner calibration, noise, grid, storage and case mix")
    p.add_argument("--clinical-resolution", action="store_true",
                   help="0.98 mm, 512 x 512, 2.5 mm slices (slow; the default grid is 2.2 x 2.2 x 5 mm)")
    p.add_argument("--planning-fov", action="store_true",
                   help="a planning CT's field of view: from the neck (above the cricoid) to the upper abdomen "
                        "(liver, stomach, kidneys, bowel gas), varied per case; default: the thorax only")
    p.add_argument("--bilateral-share", type=float, metavar="P",
                   help="share of bilateral notes (default 0.03, external site 0.05): more of the rarest kind of "
                        "case for training")
    p.add_argument("--arms-up", type=float, metavar="P",
                   help="share of patients with their arms up on a breast board (default 1, external site 0.85); "
                        "the rest lie with their arms down, as some planning CTs are taken")
    p.add_argument("--splits", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=(0.6, 0.2, 0.2),
                   help="split fractions (default 0.6 0.2 0.2; '1 0 0': every case for training)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def run(args) -> dict:
    from dataclasses import replace

    from ..data.phantom import PhantomConfig
    from ..data.phantom_dataset import summarize, write_dataset
    from .common import UsageError

    cfg = PhantomConfig.clinical() if args.clinical_resolution else PhantomConfig()
    if args.external:
        cfg = PhantomConfig.external_site(cfg)
    if args.planning_fov:
        cfg = replace(cfg, planning_fov=True)
    for flag, value, field in (("--bilateral-share", args.bilateral_share, "p_bilateral"),
                               ("--arms-up", args.arms_up, "arms_up_fraction")):
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{flag} must lie in [0, 1], got {value}")
            cfg = replace(cfg, **{field: value})
    t0 = time.perf_counter()
    manifest = write_dataset(args.n, args.out, seed=args.seed, config=cfg, split_fractions=args.splits,
                             progress=not args.json)
    summary = {**summarize(manifest), "external": bool(args.external), "planning_fov": bool(args.planning_fov),
               "seconds": round(time.perf_counter() - t0, 2)}
    if not args.json:
        print(f"wrote {summary['n']} phantom cases in {summary['seconds']} s -> {manifest}")
        print("  splits:  " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
        print("  targets: " + ", ".join(f"{k} {v}" for k, v in summary["targets"].items()))
        print(f"  treated side visible on CT (mastectomy, or a seroma, clips, thicker skin or a scar after "
              f"breast-conserving surgery): {summary['treatment_visible']} of {summary['n']} cases")
        if summary["conserved_breasts"]:
            print(f"  conserved breasts showing the surgery: {summary['conserved_visible']:.0%} of "
                  f"{summary['conserved_breasts']}; {summary['conserved_visible_5mm']:.0%} on a 5 mm grid "
                  "(clips alone are too small for it)")
    return summary
