"""``mmcontour predict``: one CT (``--ct``), or a manifest of CTs (``--manifest``, sharded under torchrun)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..dicom.export import DEFAULT_ROI_TEMPLATE
from .common import (UsageError, add_model_arguments, add_note_arguments, check_outputs, contourer_from_args,
                     note_from_args, tqdm_progress)


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="contour one CT (or a manifest of CTs) from its clinical note")
    p.add_argument("--ct", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--out", help="output .seg.nrrd (Slicer) or .nii.gz labelmap; with --manifest, a folder")
    p.add_argument("--manifest", help="CSV of cases (columns: docs/INTERFACES.md) to contour in one run")
    add_structure_argument(p)
    add_export_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    add_note_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run)


#: ``inference.contourer.SEGMENT_MODES`` (not imported: it loads torch; Testing/test_cli.py checks they agree).
STRUCTURE_MODES = ("both", "regions", "union")


def add_structure_argument(parser) -> None:
    parser.add_argument(
        "--structures", choices=STRUCTURE_MODES, default="both",
        help="which segments to write (every output: .seg.nrrd, RTSTRUCT, DICOM SEG, manifest runs): "
             "both = the whole CTV then one segment per structure drawn (CTVp_Breast_L, CTVn_L1_L, ...); "
             "regions = only the structures; union = only the whole CTV. A bundle with one CTV output "
             "writes the CTV for every choice (default: %(default)s)")


def add_export_arguments(parser) -> None:
    """The DICOM outputs of ``mmcontour predict``: the CT must be a DICOM series folder."""
    parser.add_argument("--out-rtstruct", type=Path, metavar="FILE",
                        help="also write the segments (--structures) as a DICOM RTSTRUCT referencing the input "
                             "CT series, one ROI each")
    parser.add_argument("--out-dicom-seg", type=Path, metavar="FILE",
                        help="also write the segments (--structures) as a DICOM Segmentation referencing the "
                             "input CT series, one segment each")
    parser.add_argument("--roi-name", default=DEFAULT_ROI_TEMPLATE, metavar="TEMPLATE",
                        help="TG-263-style ROI name of the whole CTV; {lat} becomes _L/_R from the note; the "
                             "structures keep their own names (default: %(default)s)")
    parser.add_argument("--roi-color", default="255,0,0", metavar="R,G,B",
                        help="colour of the whole CTV; the structures keep their table colours (default: %(default)s)")


def run(args) -> dict:
    """Every argument and output is checked, then the CT is read and checked, then the model loads; the
    outputs (segmentation, RTSTRUCT, DICOM SEG) are written together or not at all."""
    from ..image.fileio import OutputGroup
    from ..image.preprocess import validate_ct
    from ..image.readwrite import read_image, write_segmentation

    if args.manifest:
        return run_manifest(args)
    if not args.ct or not args.out:
        raise UsageError("predict needs --ct and --out (or --manifest CSV --out DIR)")
    out = Path(args.out)
    if not str(out).endswith((".seg.nrrd", ".nii.gz", ".nii", ".nrrd")):
        raise UsageError(f"--out {out}: use a .seg.nrrd (Slicer segmentation) or .nii.gz / .nrrd (labelmap) name")
    extra_outputs = [Path(p) for p in (args.out_rtstruct, args.out_dicom_seg) if p]
    if extra_outputs and not Path(args.ct).is_dir():
        raise UsageError("--out-rtstruct / --out-dicom-seg need --ct to be the CT's DICOM series folder")
    note = note_from_args(args)  # fail on a bad note before loading any model
    if extra_outputs:
        from ..dicom.export import check_export_options

        check_export_options(args.roi_name, args.roi_color, note)
    inputs = [args.ct, getattr(args, "note_file", None), args.bundle, args.llm]
    check_outputs([out, *extra_outputs], args.overwrite, inputs)
    image = read_image(args.ct)
    validate_ct(image)  # a CT that cannot be contoured is refused before the model loads
    contourer = contourer_from_args(args)
    result = contourer.contour(image, note, progress=tqdm_progress(not args.json))
    segments = result.segments(args.structures)
    file_segments, labels = file_masks(result, args.structures, out)
    summary = {"ct": str(args.ct), "out": str(out), **result.summary(), "structures_mode": args.structures,
               "segments": list(file_segments), "llm_calls": contourer.llm_calls}
    if labels:
        summary["labels"] = {str(v): name for name, v in labels.items()}
    with OutputGroup() as group:
        write_segmentation(out, file_segments, attributes={**result.provenance, "structures": args.structures},
                           sides={"CTV": note.side}, labels=labels, group=group)
        if extra_outputs:
            from ..dicom.export import export_prediction

            written = export_prediction(segments, args.ct, out_rtstruct=args.out_rtstruct,
                                        out_dicom_seg=args.out_dicom_seg, note=note, roi_template=args.roi_name,
                                        color=args.roi_color, provenance=result.provenance, group=group)
            summary.update({k: str(v) for k, v in written.items()})
    if not args.json:
        print(f"CTV: {summary['volume_cc']:.1f} cc, prompt '{result.prompt}', {result.timings['total']:.1f} s -> {out}")
        for line in structure_lines(summary["structures"]):
            print("  " + line)
        if labels:
            print("  labels in " + out.name + ": " + ", ".join(f"{v} = {n}" for n, v in labels.items())
                  + " (the CTV: every labelled voxel)")
        if result.review.needs_review:  # the structures' own flags are on their lines above
            reasons = [r.line() for r in result.review.reasons if not r.structure]
            flagged = list(dict.fromkeys(r.structure for r in result.review.reasons if r.structure))
            if flagged:
                reasons.append(f"{len(flagged)} structure(s) flagged above: {', '.join(flagged)}")
            print("REVIEW: " + "; ".join(reasons))
    return summary


def file_masks(result, mode: str, out: Path) -> tuple[dict, dict[str, int] | None]:
    """The segments of the ``--out`` file and, for a labelmap (.nii.gz / .nrrd), their label values. A
    labelmap holds one label per voxel, so it cannot hold the CTV beside its structures: with ``regions``
    or ``both`` it holds the structures drawn, each as 1 + its position in the bundle's classes
    (``ContourResult.classes``, the structure table's order; the CTV is every labelled voxel); with ``union``
    or a one-CTV bundle, label 1 = CTV. A ``.seg.nrrd`` holds ``result.segments(mode)`` as they are."""
    segments = result.segments(mode)
    if str(out).endswith(".seg.nrrd"):
        return segments, None
    if mode == "union" or result.labels is None or not result.structures:
        return {"CTV": result.mask}, {"CTV": 1}
    structures = result.structures
    return structures, {name: 1 + result.classes.index(name) for name in structures}


def structure_lines(structures: list[dict]) -> list[str]:
    """One line per structure drawn, called for by the note or flagged (name, volume in cc, why it is
    flagged); the rest in one line."""
    lines, rest = [], []
    for s in structures:
        if s["volume_cc"] > 0 or s["expected"] or s["flags"]:
            called = "called for by the note" if s["expected"] else "not called for by the note"
            flags = "".join(f"; flag: {f}" for f in s["flags"])
            lines.append(f"{s['name']}: {s['volume_cc']:.1f} cc ({called}){flags}")
        else:
            rest.append(s["name"])
    if rest:
        lines.append("not drawn, not called for by the note: " + ", ".join(rest))
    return lines


def run_manifest(args) -> dict:
    """``mmcontour predict --manifest CSV --out DIR``: contour this process's share of the cases."""
    from ..data.manifest import read_manifest
    from ..inference.batch import contour_manifest, device_for, my_share, run_id, shard
    from ..model.bundle_info import default_bundle_path, read_bundle_summary

    if not args.out:
        raise UsageError("--manifest needs --out DIR (the folder for <case_id>.seg.nrrd and summary.json)")
    if getattr(args, "ct", None):
        raise UsageError("give either --ct (one CT) or --manifest (many), not both")
    note_args = ("note", "note_file", "age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology")
    if any(getattr(args, k, None) for k in note_args):
        raise UsageError("with --manifest each case's note comes from its row; drop --note / --note-file / --side / --n ...")
    if getattr(args, "out_rtstruct", None) or getattr(args, "out_dicom_seg", None):
        raise UsageError("--out-rtstruct / --out-dicom-seg work for one CT; with --manifest the output is DIR/*.seg.nrrd")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; with --manifest give a folder")
    rows = read_manifest(args.manifest)
    try:  # an output made by another bundle is redone; read without torch, so a finished run loads nothing
        bundle_id = read_bundle_summary(args.bundle or default_bundle_path()).get("bundle_id") or None
    except (FileNotFoundError, ValueError):
        bundle_id = None  # loading the bundle (if a case needs it) reports the problem
    rank, world, local_rank = shard()
    device = device_for(args.device, world, local_rank)

    show = not args.json
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(my_share(rows, rank, world)), desc=f"cases (rank {rank}/{world})" if world > 1 else "cases", file=sys.stderr)

    def on_case(position: int, total: int, entry: dict) -> None:
        if entry["status"] == "failed":
            print(f"mmcontour predict: case {entry['case_id']} failed: {entry['error']}", file=sys.stderr)
        if bar is not None:
            bar.update(1)

    try:
        report = contour_manifest(rows, out_dir, lambda: contourer_from_args(_with(args, device=device)),
                                  overwrite=args.overwrite, rank=rank, world=world, run=run_id(world),
                                  info={"manifest": str(args.manifest), "bundle": str(args.bundle or "")},
                                  on_case=on_case, bundle_id=bundle_id, structures=args.structures)
    finally:
        if bar is not None:
            bar.close()
    if show:
        print(f"{report['ok']} contoured, {report['failed']} failed, {report['skipped']} skipped "
              f"of {report['cases_total']} cases in {report['seconds']:.1f} s -> {out_dir}", file=sys.stderr)
    return report


def _with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})
