"""``mmcontour evaluate``: bundles x a manifest split -> metrics, tables and overlays (``training.evaluate``)."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice / IoU / HD95 with bootstrap CIs, clinical accuracy and text-following",
        description="Evaluate bundle(s) on a manifest split. Writes OUT/metrics.json, OUT/cases.csv, OUT/table.md "
                    "(paper Table 1 layout) and OUT/overlays/. Clinical accuracy, nodal text-following and the "
                    "truth for counterfactual notes need a 'regions' column (phantom manifests).")
    p.add_argument("--bundle", required=True, nargs="+", help="one or more bundle folders (one table row each)")
    p.add_argument("--label", nargs="+", default=(), help="table names for the bundles (default: bundle names)")
    p.add_argument("--manifest", required=True, help="CSV of cases (columns: docs/INTERFACES.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="test", help="manifest split to evaluate ('all': every case; default test)")
    p.add_argument("--llm", help="where the bundles' LLM is, if not where they say")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--coverage-threshold", type=float, default=0.5,
                   help="a region is targeted when the contour covers more than this fraction of it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-counterfactuals", dest="counterfactuals", action="store_false",
                   help="skip contouring with counterfactual notes (text-following)")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the PNG overlays")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def run(args) -> dict | None:
    from ..training.evaluate import EvalConfig, evaluate

    config = EvalConfig(manifest=args.manifest, out=args.out, bundles=args.bundle, labels=args.label,
                        split=None if args.split == "all" else args.split, llm=args.llm, device=args.device,
                        counterfactuals=args.counterfactuals, coverage_threshold=args.coverage_threshold,
                        n_bootstrap=args.bootstrap, seed=args.seed, overlays=args.overlays, progress=not args.json)
    metrics = evaluate(config)
    if not args.json:
        print((Path(args.out) / "table.md").read_text())
        print(f"-> {args.out}/metrics.json, cases.csv, table.md, overlays/")
        return None
    keep = ("model", "dice", "iou", "hd95_mm", "clinical", "side_found", "side_found_unilateral", "structures",
            "text_following")
    return {"out": str(args.out), "models": [{k: m[k] for k in m if k in keep} for m in metrics["models"]]}
