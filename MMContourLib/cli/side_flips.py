"""``mmcontour side-flips``: side-flipped training cases (``data.side_flips.write_side_flips``)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "side-flips", help="training cases whose note names the other side than the CT shows (phantoms)",
        description="Picks a share of a manifest's one-sided training cases and writes them again with the other "
                    "side in their note and the CTV that note asks for, built from the case's regions map "
                    "(phantoms label both sides; a hospital export cannot be flipped). Only the CTVs are "
                    "written (DIR/cases/<id>-flip_ctv.nii.gz); DIR/manifest.csv points at the original CTs. "
                    "Merge it into the training manifest with merge-manifests.")
    p.add_argument("manifest", help="the manifest whose training cases are flipped")
    p.add_argument("--out", required=True, help="output folder (DIR/manifest.csv, DIR/cases/)")
    p.add_argument("--share", type=float, required=True, metavar="P",
                   help="share of the one-sided training cases to flip, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/manifest.csv")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def run(args) -> dict:
    from pathlib import Path

    from ..data.side_flips import write_side_flips
    from .common import UsageError, check_output

    if not 0.0 < args.share <= 1.0:
        raise UsageError(f"--share must lie in (0, 1], got {args.share}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check_output(Path(args.out) / "manifest.csv", args.overwrite, inputs=[args.manifest])
    summary = write_side_flips(args.manifest, args.out, args.share, seed=args.seed)
    if not args.json:
        print(f"wrote {summary['cases']} side-flipped cases ({summary['mastectomies']} mastectomies) of "
              f"{summary['one_sided']} one-sided training cases -> {summary['manifest']}")
    return summary
