"""The ``mmcontour`` command. Each module that adds a subcommand defines ``register_cli(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..model.bundle_info import default_bundle_path

#: Modules that add subcommands (imported lazily; a module that is not present is skipped).
SUBCOMMAND_MODULES = ("data.phantom_dataset", "training.train", "training.evaluate", "cli.demo", "dicom.archive", "bench.measure", "inference.batch")

#: Subcommands whose module is imported only when that subcommand is parsed: name -> (module, the help line
#: ``mmcontour --help`` lists, the same as the module's ``register_cli`` gives; test_cli checks that they
#: agree). ``mmcontour --help`` and ``mmcontour phantom --help`` then need neither torch nor MONAI. A module of
#: SUBCOMMAND_MODULES that has no entry here is imported when the parser is built.
LAZY_SUBCOMMANDS = {
    "phantom": ("data.phantom_dataset", "write synthetic breast CTs, CTVs, sub-region labels and manifest.csv"),
    "train": ("training.train", "train a model bundle from a manifest of CTs, CTVs and clinical notes"),
    "evaluate": ("training.evaluate", "Dice / IoU / HD95 with bootstrap CIs, clinical accuracy and text-following"),
    "demo": ("cli.demo", "offline end-to-end demo on a synthetic CT with several notes"),
    "import-dicom": ("dicom.archive", "convert planning CT + RTSTRUCT exports into a training manifest"),
    "bench": ("bench.measure", "measure speed and memory (contouring, note edits, training)"),
}

class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback, exit status 2."""


def add_note_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("clinical note (free text or structured fields)")
    g.add_argument("--note", help='e.g. "N1, breast conserving surgery, left side" (paper Table 5 form)')
    g.add_argument("--age")
    g.add_argument("--side", help="left / right / both (Lt, Rt, bilateral ...)")
    g.add_argument("--t", dest="t_stage", help="T stage, e.g. cT1c, Tis")
    g.add_argument("--n", dest="n_stage", help="N stage, e.g. N0, 1mi, pN1a, ypN2; bilateral: left:N0;right:N2")
    g.add_argument("--m", dest="m_stage", help="M stage, e.g. M0")
    g.add_argument("--surgery", help="bcs / mastectomy (lumpectomy, partial, total, MRM ...)")
    g.add_argument("--chemotherapy", help="none / adjuvant / neoadjuvant")
    g.add_argument("--pathology", help="IDC / ILC / DCIS / ...")


def note_from_args(args):
    from ..note.clinical import ClinicalNote

    fields = {k: getattr(args, k) for k in ("age", "side", "t_stage", "n_stage", "m_stage", "surgery",
                                            "chemotherapy", "pathology") if getattr(args, k, None) not in (None, "")}
    if args.note and fields:
        note = ClinicalNote.parse(args.note)
        return note.replace(**fields)
    if args.note:
        return ClinicalNote.parse(args.note)
    if not fields:
        raise UsageError("give the clinical note: --note TEXT, or --side, --n and --surgery (and optional fields)")
    return ClinicalNote.from_fields(**{"side": fields.pop("side", ""), "n_stage": fields.pop("n_stage", ""),
                                       "surgery": fields.pop("surgery", ""), **fields})


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--bundle", default=None, help="model bundle folder (default: the shipped demo bundle)")
    g.add_argument("--llm", help="where the bundle's LLM is: a local folder or a .gguf file (default: as the bundle says)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="LLM weights: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32 | int8 (8-bit, bitsandbytes)")
    g.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window size (multiples of 16)")
    g.add_argument("--overlap", type=float, help="sliding-window overlap (default: the bundle's)")
    g.add_argument("--sw-batch-size", type=int, default=1)
    g.add_argument("--allow-download", action="store_true",
                   help="let --llm name a Hugging Face hub id and download it (off by default: MMContour works offline)")
    s = parser.add_argument_group("speed and memory (docs/performance.md)")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="U-Net arithmetic: auto (bf16 autocast on a GPU, fp32 on the CPU)")
    s.add_argument("--channels-last", action="store_true", help="channels-last 3D memory layout for the U-Net")
    s.add_argument("--compile", action="store_true", help="torch.compile the U-Net (the first contour pays for it)")
    s.add_argument("--cache-features", default="auto", choices=("auto", "device", "host", "off"),
                   help="keep the note-independent encoder features of the last CT, so an edited note skips "
                        "them (auto: on the GPU if there is room, else host memory)")
    s.add_argument("--offload-llm", action="store_true",
                   help="move the LLM off the GPU after encoding the note; on a CPU, free it and load it again "
                        "for the next new note (less memory while the U-Net runs, slower note edits)")


def contourer_from_args(args):
    from ..inference.contourer import Contourer

    bundle = Path(args.bundle) if args.bundle else default_bundle_path()
    return Contourer.from_bundle(bundle, llm=args.llm, device=args.device, dtype=args.dtype, roi_size=args.roi,
                                 overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                 allow_download=args.allow_download, precision=args.precision,
                                 channels_last=args.channels_last, compile=args.compile,
                                 cache_features=args.cache_features, offload_llm=args.offload_llm)


def tqdm_progress(enabled: bool = True):
    """A progress(stage, done, total) callback drawing one tqdm bar per stage on stderr."""
    from tqdm import tqdm

    state = {"stage": None, "bar": None}

    def progress(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        if state["stage"] != stage:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"], state["bar"] = stage, tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total and stage == "postprocess":
            bar.close()

    return progress


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; MMContour never overwrites a file unless you pass --overwrite")
    if not path.parent.exists():
        raise UsageError(f"output folder {path.parent} does not exist")


def cmd_predict(args) -> dict:
    from ..image.readwrite import read_image, write_segmentation

    if args.manifest:
        return run_manifest(args)
    if not args.ct or not args.out:
        raise UsageError("predict needs --ct and --out (or --manifest CSV --out DIR)")
    out = Path(args.out)
    if not str(out).endswith((".seg.nrrd", ".nii.gz", ".nii", ".nrrd")):
        raise UsageError(f"--out {out}: use a .seg.nrrd (Slicer segmentation) or .nii.gz / .nrrd (labelmap) name")
    extra_outputs = [Path(p) for p in (args.out_rtstruct, args.out_dicom_seg) if p]
    for path in [out, *extra_outputs]:
        _check_output(path, args.overwrite)
    note = note_from_args(args)  # fail on a bad note before loading any model
    image = read_image(args.ct)
    contourer = contourer_from_args(args)
    result = contourer.contour(image, note, progress=tqdm_progress(not args.json))
    sides = {"CTV": note.side}
    write_segmentation(out, {"CTV": result.mask}, attributes=result.provenance, sides=sides)
    summary = {"ct": str(args.ct), "out": str(out), **result.summary(), "llm_calls": contourer.llm_calls}
    if extra_outputs:
        from ..dicom.export import export_prediction

        if not Path(args.ct).is_dir():
            raise UsageError("--out-rtstruct / --out-dicom-seg need --ct to be the CT's DICOM series folder")
        written = export_prediction(result.mask, args.ct, out_rtstruct=args.out_rtstruct,
                                    out_dicom_seg=args.out_dicom_seg, note=note, roi_template=args.roi_name,
                                    color=args.roi_color, provenance=result.provenance)
        summary.update({k: str(v) for k, v in written.items()})
    if not args.json:
        print(f"CTV: {summary['volume_cc']:.1f} cc, prompt '{result.prompt}', {result.timings['total']:.1f} s -> {out}")
    return summary


def run_manifest(args) -> dict:
    """``mmcontour predict --manifest CSV --out DIR``: contour this process's share of the cases."""
    from ..inference.batch import _device_for, _run_id, contour_manifest, my_share, read_manifest, shard

    if not args.out:
        raise UsageError("--manifest needs --out DIR (the folder for <case_id>.seg.nrrd and summary.json)")
    if getattr(args, "ct", None):
        raise UsageError("give either --ct (one CT) or --manifest (many), not both")
    note_args = ("note", "age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology")
    if any(getattr(args, k, None) for k in note_args):
        raise UsageError("with --manifest each case's note comes from its row; drop --note / --side / --n ...")
    if getattr(args, "out_rtstruct", None) or getattr(args, "out_dicom_seg", None):
        raise UsageError("--out-rtstruct / --out-dicom-seg work for one CT; with --manifest the output is DIR/*.seg.nrrd")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; with --manifest give a folder")
    rows = read_manifest(args.manifest)
    rank, world, local_rank = shard()
    device = _device_for(args.device, world, local_rank)

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
                                  overwrite=args.overwrite, rank=rank, world=world, run=_run_id(world),
                                  info={"manifest": str(args.manifest), "bundle": str(args.bundle or "")},
                                  on_case=on_case)
    finally:
        if bar is not None:
            bar.close()
    if show:
        print(f"{report['ok']} contoured, {report['failed']} failed, {report['skipped']} skipped "
              f"of {report['cases_total']} cases in {report['seconds']:.1f} s -> {out_dir}", file=sys.stderr)
    return report


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


class _LazySubParsersAction(argparse._SubParsersAction):
    """Subparsers where a subcommand of LAZY_SUBCOMMANDS starts as an empty placeholder (listed with its help
    line) and gets its arguments from its module's ``register_cli`` when it is the subcommand being parsed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy_modules: dict[str, str] = {}  # placeholder subcommand -> module that registers it

    def add_lazy_parser(self, name: str, module: str, help: str) -> None:
        self.add_parser(name, help=help)
        self._lazy_modules[name] = module

    def load(self, name: str) -> None:
        """Import the module behind ``name`` and let it register its subcommand(s) in place of the placeholders."""
        module_name = self._lazy_modules.get(name)
        if module_name is None:
            return
        names = [n for n, m in self._lazy_modules.items() if m == module_name]
        for n in names:
            del self._lazy_modules[n]
        module = importlib.import_module(f"MMContourLib.{module_name}")
        placeholders = {n: self._name_parser_map.pop(n) for n in names}  # register_cli adds them afresh
        listed = list(self._choices_actions)
        module.register_cli(self)
        for n, placeholder in placeholders.items():
            self._name_parser_map.setdefault(n, placeholder)
        known = {a.dest for a in listed}  # keep the listing (and its order) that --help showed
        self._choices_actions[:] = listed + [a for a in self._choices_actions[len(listed):] if a.dest not in known]

    def __call__(self, parser, namespace, values, option_string=None):
        if values:
            self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcontour", description="Clinical-note-conditioned breast CTV contouring.")
    parser.add_argument("--version", action="version", version=f"mmcontour {__version__}")
    parser.register("action", "parsers", _LazySubParsersAction)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="contour one CT (or a manifest of CTs) from its clinical note")
    p.add_argument("--ct", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--out", help="output .seg.nrrd (Slicer) or .nii.gz labelmap; with --manifest, a folder")
    p.add_argument("--manifest", help="CSV of cases (DESIGN.md columns) to contour in one run")
    from ..dicom.export import add_export_arguments

    add_export_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    add_note_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=cmd_predict)

    for name in SUBCOMMAND_MODULES:
        lazy = [(command, help_line) for command, (module, help_line) in LAZY_SUBCOMMANDS.items() if module == name]
        if lazy:
            if importlib.util.find_spec(f"MMContourLib.{name}") is not None:
                for command, help_line in lazy:
                    sub.add_lazy_parser(command, name, help_line)
            continue
        try:
            module = importlib.import_module(f"MMContourLib.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"MMContourLib.{name}":
                continue
            raise
        if hasattr(module, "register_cli"):
            module.register_cli(sub)
    return parser


def load_subcommands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill in every lazy subcommand of ``parser`` (from build_parser) now: for tools that inspect the parser."""
    for action in parser._actions:
        if isinstance(action, _LazySubParsersAction):
            for name in list(action._lazy_modules):
                action.load(name)
    return parser


def main(argv=None) -> int:
    from ..note.clinical import ContradictionError, NoteError

    parser = build_parser()
    args = parser.parse_args(argv)
    known = (UsageError, NoteError, ContradictionError, FileNotFoundError, ValueError, RuntimeError)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("mmcontour: interrupted; files are written whole or not at all, so what was finished is kept "
              "and nothing is left half-written", file=sys.stderr)
        return 130
    except known as exc:
        if os.environ.get("MMCONTOUR_DEBUG"):
            raise
        print(f"mmcontour {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("failed"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
