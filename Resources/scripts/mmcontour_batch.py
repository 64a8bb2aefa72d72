"""Contour every case of a manifest headlessly: one .seg.nrrd per case and a summary.json.

    Slicer --no-main-window --python-script mmcontour_batch.py -- --manifest cases.csv --bundle B --out DIR
    PythonSlicer mmcontour_batch.py --manifest cases.csv --bundle B --out DIR
    python mmcontour_batch.py ...            (any Python with MMContourLib's requirements)

Manifest: CSV with ``case_id`` and ``ct`` (paths relative to the CSV; a file or a DICOM series
folder) and the note, either as a ``note`` column ("N1, breast conserving surgery, left side") or
as the columns ``side, n_stage, surgery`` (+ optional ``age, t_stage, m_stage, chemotherapy,
pathology``; bilateral as ``left:N0;right:N2``), or both: a fact stated in both must agree (a ``note``
saying left and a ``side`` column saying right refuses the manifest). A ``ctv`` column, when present, adds a Dice per
case to the summary. Other columns (``split``...) are ignored unless ``--split`` selects on them.

The model is loaded once. Every input row is checked before any work starts. Outputs are written
atomically; an existing output is kept (the case is skipped) unless ``--overwrite``, so a batch
that stopped can simply be run again.

Exit status: 0 all cases contoured; 1 some cases failed (see summary.json); 2 unusable input
(manifest, bundle, LLM, missing packages); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def _library_root() -> Path:
    """MMContourLib sits two folders up: <repo>/Resources/scripts or <qt-scripted-modules>/Resources/scripts."""
    here = Path(__file__).resolve().parent
    for root in (here.parent.parent, here.parent, here):
        if (root / "MMContourLib" / "__init__.py").is_file():
            return root
    return here.parent.parent


ROOT = _library_root()
sys.path.insert(0, str(ROOT))
# The installer is the module's MMContourInstall.py: in MMContour/ in a source checkout; the extension build
# installs it with MMContour.py straight into qt-scripted-modules (MMContour/CMakeLists.txt), i.e. ROOT.
for _folder in (ROOT / "MMContour", ROOT):
    if (_folder / "MMContourInstall.py").is_file():
        sys.path.insert(1, str(_folder))
        break

EXIT_OK, EXIT_FAILED_CASES, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BatchError(Exception):
    """Input the batch cannot use; the message says what to fix."""


def parse_args(argv):
    argv = list(argv)
    if argv and argv[0] == "--":  # Slicer passes its "--" separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="mmcontour_batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV: case_id, ct, and the note (see above)")
    parser.add_argument("--bundle", help="model bundle folder (default: $MMCONTOUR_BUNDLE, else the shipped demo bundle)")
    parser.add_argument("--out", required=True, help="output folder: <case_id>.seg.nrrd + summary.json")
    parser.add_argument("--llm", help="LLM folder or .gguf file (default: the one the bundle names)")
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--split", help="only rows whose 'split' column has this value")
    parser.add_argument("--overwrite", action="store_true", help="recompute cases whose output exists")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed case")
    parser.add_argument("--structures", choices=("both", "regions", "union"), default="both",
                        help="segments of each output: both = the whole CTV then one per structure drawn, regions = "
                             "only the structures, union = only the CTV (default: %(default)s)")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="pip-install missing packages first (Resources/requirements-slicer.txt)")
    return parser.parse_args(argv)


def ensure_dependencies(install: bool, bundle: Path) -> None:
    from MMContourInstall import DependencyError, InstallLogic

    try:
        InstallLogic.for_this_python(ROOT).ensure(bundle, install=install, allow_hint="pass --install-dependencies")
    except DependencyError as exc:
        raise BatchError(str(exc)) from None


# -- the batch: MMContourLib.inference.batch does the work ------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(manifest: Path, bundle: Path) -> Callable[[dict], dict]:
    """summary.json in this script's documented form, from the engine's report."""
    keys = ("case_id", "ct", "prompt", "segmentation", "status", "voxels", "volume_cc", "segments", "structures",
            "seconds", "dice", "error")

    def view(report: dict) -> dict:
        cases = []
        for entry in report["cases"]:
            case = {**entry, "segmentation": Path(entry["out"]).name}
            if case["status"] == "skipped":
                case["status"], case["error"] = "skipped (output exists; --overwrite recomputes)", ""
            cases.append({k: case[k] for k in keys if case.get(k) not in (None, "")})
        return {"manifest": str(manifest.resolve()), "bundle": str(bundle.resolve()), "device": report["device"],
                "model": report["model"], "load_model_s": report["model_load_s"], "status": report["status"],
                "failed": report["failed_cases"], "contoured": report["ok"], "llm_calls": report["llm_calls"],
                "total_s": report["seconds"], "cases": cases}

    return view


def _show_case(position: int, total: int, entry: dict) -> None:
    where = f"[{position}/{total}] {entry['case_id']}"
    if entry["status"] == "skipped":
        _say(f"{where}: exists, skipped")
    elif entry["status"] == "failed":
        _say(f"{where}: FAILED: {entry['error']}\n{entry['traceback'].rstrip()}")
    else:
        _say(f"{where}: {entry['volume_cc']} cc in {entry['seconds']} s"
             + (f", Dice {entry['dice']}" if "dice" in entry else ""))


def run(args) -> int:
    from MMContourLib.data.manifest import ManifestError, read_manifest
    from MMContourLib.inference import batch
    from MMContourLib.model.bundle_info import default_bundle_path

    manifest = Path(args.manifest).expanduser()
    out = Path(args.out).expanduser()
    try:
        rows = read_manifest(manifest, split=args.split, check=True)
    except (ManifestError, FileNotFoundError) as exc:
        raise BatchError(str(exc)) from None
    bundle = Path(args.bundle).expanduser() if args.bundle else default_bundle_path()
    ensure_dependencies(args.install_dependencies, bundle)
    if not batch.pending(rows, out, args.overwrite, structures=args.structures):
        _say(f"mmcontour_batch: all {len(rows)} output(s) exist in {out}; nothing to do (--overwrite recomputes)")
        return EXIT_OK

    def load_model():
        from MMContourLib.inference.contourer import Contourer

        _say(f"mmcontour_batch: {len(rows)} case(s) from {manifest}; loading {bundle} ...")
        try:
            return Contourer.from_bundle(bundle, llm=args.llm, device=args.device)
        except (FileNotFoundError, RuntimeError, ValueError) as exc:  # BundleError, LLMNotFoundError, ... among them
            raise BatchError(f"cannot load the model: {exc}") from None

    try:
        report = batch.contour_manifest(rows, out, load_model, overwrite=args.overwrite, score=True,
                                        stop_on_error=args.stop_on_error, summary_view=_summary(manifest, bundle),
                                        on_case=_show_case, structures=args.structures)
    except KeyboardInterrupt:
        _say(f"mmcontour_batch: interrupted; {out / batch.SUMMARY_NAME} lists the cases done")
        return EXIT_INTERRUPTED
    failed = report["failed_cases"]
    _say(f"mmcontour_batch: {report['ok']} contoured, {len(failed)} failed, {report['seconds']} s "
         f"-> {report['summary']}")
    if failed:
        _say(f"mmcontour_batch: error: {len(failed)} case(s) failed: {', '.join(failed)} (details in summary.json)")
        return EXIT_FAILED_CASES
    return EXIT_OK


def main(argv=None) -> int:
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except BatchError as exc:
        _say(f"mmcontour_batch: error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _exit(status: int) -> None:
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):  # inside the Slicer application
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(main())
