"""Archive-scale contouring: ``mmcontour predict --manifest CSV --out DIR``.

Every case of the manifest (DESIGN.md columns; a free-text ``note`` column, when present and
filled, is used instead of the structured fields) is contoured with one ``Contourer`` (the LLM is
loaded once per process) into ``DIR/<case_id>.seg.nrrd``. A case that fails is reported and the
others go on; ``DIR/summary.json`` lists every case with its status, error, timings and volume.

Under ``torchrun --nproc_per_node N`` each process takes the cases ``i % WORLD_SIZE == RANK`` on
its own GPU (``cuda:LOCAL_RANK``), writes ``summary.rank<R>.json``, and the last one to finish
merges them into ``summary.json``. No process group is needed: the processes share nothing but
the output folder.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

from .fileio import write_json

SUMMARY_NAME = "summary.json"


class ManifestError(ValueError):
    """A manifest that cannot be used as a whole (the message says which row and column)."""


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a manifest CSV, ``ct`` resolved against the CSV's folder; ids checked to be usable file names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("case_id", "ct") if c not in columns]
        if missing:
            raise ManifestError(f"manifest {path} lacks the column(s) {', '.join(missing)} (has: {', '.join(columns)})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        case = row["case_id"]
        if not case or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", case):
            raise ManifestError(f"manifest {path}, line {i}: case_id {case!r} must be letters, digits, '.', '_' or '-' "
                                "(it names the output file)")
        if case in seen:
            raise ManifestError(f"manifest {path}: case_id {case!r} appears on lines {seen[case]} and {i}")
        seen[case] = i
        if row["ct"]:
            ct = Path(row["ct"]).expanduser()
            row["ct"] = str(ct if ct.is_absolute() else path.parent / ct)
    return rows


def shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}")
    return rank, world, local


def _device_for(requested: str, world: int, local_rank: int) -> str:
    import torch

    if world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return requested


def _note_for(row: dict[str, str]):
    from .note import ClinicalNote

    if row.get("note"):
        return ClinicalNote.parse(row["note"])
    return ClinicalNote.from_row(row)


def contour_case(contourer, row: dict[str, str], out_dir: Path, overwrite: bool) -> dict:
    """Contour one manifest row; never raises for a problem with the case itself."""
    from .imageio import read_image, write_segmentation

    out = out_dir / f"{row['case_id']}.seg.nrrd"
    entry: dict = {"case_id": row["case_id"], "ct": row.get("ct", ""), "out": str(out)}
    if out.exists() and not overwrite:
        return {**entry, "status": "skipped", "error": f"{out.name} exists (pass --overwrite to replace it)"}
    start = time.perf_counter()
    stage = "note"
    try:
        note = _note_for(row)
        stage = "read CT"
        if not row.get("ct"):
            raise ValueError("the manifest gives no CT path")
        image = read_image(row["ct"])
        stage = "contour"
        result = contourer.contour(image, note)
        stage = "write"
        write_segmentation(out, {"CTV": result.mask}, attributes={**result.provenance, "case_id": row["case_id"]},
                           sides={"CTV": note.side})
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad case must not stop an archive run
        detail = str(exc).strip() or exc.__class__.__name__
        return {**entry, "status": "failed", "error": f"{stage}: {exc.__class__.__name__}: {detail}",
                "traceback": traceback.format_exc(limit=4), "seconds": round(time.perf_counter() - start, 3)}
    return {**entry, "status": "ok", "error": "", "prompt": result.prompt, "voxels": result.voxels,
            "volume_cc": round(result.volume_cc, 2), "windows": result.windows,
            "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
            "seconds": round(time.perf_counter() - start, 3)}


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, default=str)


def _counts(cases: list[dict]) -> dict[str, int]:
    return {s: sum(c["status"] == s for c in cases) for s in ("ok", "failed", "skipped")}


def _merge_if_complete(out_dir: Path, run: str, world: int) -> Path | None:
    """Whichever process finishes last finds every rank's part and writes summary.json."""
    parts = []
    for r in range(world):
        part = out_dir / f"summary.rank{r}.json"
        try:
            data = json.loads(part.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("run") != run:
            return None  # a part left by an earlier run: that rank has not finished this one yet
        parts.append(data)
    cases = sorted((c for p in parts for c in p["cases"]), key=lambda c: c["order"])
    merged = {**{k: parts[0][k] for k in ("manifest", "bundle", "run", "world_size")},
              "cases_total": len(cases), **_counts(cases), "seconds_per_rank": [p["seconds"] for p in parts],
              "model_load_s_per_rank": [p["model_load_s"] for p in parts], "cases": cases}
    target = out_dir / SUMMARY_NAME
    _write_json(target, merged)
    return target


def run_manifest(args) -> dict:
    """``mmcontour predict --manifest CSV --out DIR``: contour this process's share of the cases."""
    from .cli import UsageError, contourer_from_args

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
    mine = [(i, row) for i, row in enumerate(rows) if i % world == rank]
    out_dir.mkdir(parents=True, exist_ok=True)
    # identifies this torchrun launch, so that parts left by an earlier run are never merged in
    env = os.environ.get
    run = f"{env('TORCHELASTIC_RUN_ID', '')}@{env('MASTER_ADDR', '')}:{env('MASTER_PORT', '')}" if world > 1 else "single"

    start = time.perf_counter()
    device = _device_for(args.device, world, local_rank)
    bundle_arg = args.bundle
    load_start = time.perf_counter()
    contourer = contourer_from_args(_with(args, device=device))
    contourer.cache_features = "off"  # every CT is seen once: keeping its features would only cost memory
    model_load_s = time.perf_counter() - load_start

    show = not args.json
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"cases (rank {rank}/{world})" if world > 1 else "cases", file=sys.stderr)
    cases = []
    for order, row in mine:
        entry = {"order": order, "rank": rank, **contour_case(contourer, row, out_dir, args.overwrite)}
        cases.append(entry)
        if entry["status"] == "failed":
            print(f"mmcontour predict: case {row['case_id']} failed: {entry['error']}", file=sys.stderr)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    report = {"manifest": str(args.manifest), "bundle": str(bundle_arg or ""), "run": run, "rank": rank,
              "world_size": world, "device": str(contourer.device), "model_load_s": round(model_load_s, 3),
              "seconds": round(seconds, 3), "llm_calls": contourer.llm_calls, "cases_total": len(mine),
              **_counts(cases), "cases": cases}
    if world > 1:
        _write_json(out_dir / f"summary.rank{rank}.json", report)
        merged = _merge_if_complete(out_dir, run, world)
        report["summary"] = str(merged or out_dir / f"summary.rank{rank}.json")
    else:
        _write_json(out_dir / SUMMARY_NAME, report)
        report["summary"] = str(out_dir / SUMMARY_NAME)
    if show:
        print(f"{report['ok']} contoured, {report['failed']} failed, {report['skipped']} skipped "
              f"of {len(mine)} cases in {seconds:.1f} s -> {out_dir}", file=sys.stderr)
    return report


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})
