"""``mmcontour merge-manifests``: several manifests -> one (``data.manifest.merge_manifests``)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge-manifests", help="join several case manifests into one (two archives, or extra cases of a rare kind)",
        description="Writes one manifest holding the cases of all the given manifests, their file paths rewritten "
                    "relative to --out, so one training run reads them all. Every case is checked (its note "
                    "parses, its files exist); a case id found in two manifests is refused.")
    p.add_argument("manifests", nargs="+", help="manifest CSVs to join (each keeps its cases' splits)")
    p.add_argument("--out", required=True, help="the merged manifest CSV (not one of the inputs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=run)


def run(args) -> dict:
    from collections import Counter
    from pathlib import Path

    from ..data.manifest import merge_manifests, read_manifest
    from .common import check_output

    check_output(Path(args.out), args.overwrite, inputs=args.manifests)
    out = merge_manifests(args.manifests, args.out)
    rows = read_manifest(out)
    splits = dict(Counter(row.get("split", "") for row in rows))
    summary = {"manifest": str(out), "cases": len(rows), "splits": splits, "from": list(map(str, args.manifests))}
    if not args.json:
        print(f"wrote {len(rows)} cases from {len(args.manifests)} manifest(s) -> {out} ("
              + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) + ")")
    return summary
