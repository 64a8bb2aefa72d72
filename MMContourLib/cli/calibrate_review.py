"""``mmcontour calibrate-review``: the review's confidence thresholds calibrated on a site's own cases
(``training.review_calibration``)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-review", help="calibrate the review's confidence flags on your own cases (writes a new bundle)",
        description="Contours the manifest's cases that have a regions map (the guideline's structures: "
                    "mmcontour import-dicom writes one when they are exported separately), judges each contour "
                    "clinically right or wrong, and sets the review's two uncertain-voxel thresholds so that the "
                    "whole review flags at most --budget of the right contours. Writes the bundle again to --out "
                    "with those thresholds and where they came from; its weights are unchanged. Use cases the "
                    "model will not be tested on.")
    p.add_argument("--bundle", help="the bundle to calibrate (default: the shipped demo bundle)")
    p.add_argument("--manifest", required=True, help="CSV of your cases (columns: docs/INTERFACES.md), with regions")
    p.add_argument("--out", required=True, help="the calibrated bundle's folder (not the input bundle)")
    p.add_argument("--split", default="all", help="manifest split to calibrate on ('all': every case; default all)")
    p.add_argument("--budget", type=float, default=0.2,
                   help="the share of right contours the whole review may flag (default 0.2)")
    p.add_argument("--llm", help="where the bundle's LLM is, if not where it says")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--report", help="also write the whole calibration as JSON here: each case, right or wrong, "
                                    "its flags and uncertain-voxel ratios (the audit trail of the thresholds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --report)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def _line(name: str, entry: dict) -> str:
    from ..training.review_calibration import share_text, thresholds_text

    return (f"  {name:6} {thresholds_text(entry)}: right contours flagged "
            f"{share_text(entry['right_flagged'], entry['right'])}, wrong flagged "
            f"{share_text(entry['wrong_flagged'], entry['wrong'])}")


def run(args) -> dict:
    from pathlib import Path

    from ..image.fileio import write_json
    from ..model.bundle_info import default_bundle_path
    from ..training.review_calibration import calibrate_review
    from .common import UsageError, check_outputs

    bundle = Path(args.bundle) if args.bundle else default_bundle_path()
    outputs = [Path(args.out)] + ([Path(args.report)] if args.report else [])
    check_outputs(outputs, args.overwrite, inputs=[bundle, args.manifest])
    progress = None
    if not args.json:
        progress = lambda done, total: print(f"\rcontoured {done}/{total}", end="\n" if done == total else "", flush=True)
    try:
        report = calibrate_review(bundle, args.manifest, args.out, split=None if args.split == "all" else args.split,
                                  budget=args.budget, llm=args.llm, device=args.device, progress=progress)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.report:
        write_json(Path(args.report), report, default=str)
    if not args.json:
        print(f"{report['judged']} case(s) judged ({report['right']} right, {report['wrong']} wrong); "
              f"{report['without_regions']} without a regions map left out")
        print(_line("before", report["before"]))
        print(_line("after", report["after"]))
        print(f"-> {report['out']} (bundle {report['bundle_id']}, weights unchanged)"
              + (f"; every case in {args.report}" if args.report else ""))
    return {k: v for k, v in report.items() if k != "rows"}
