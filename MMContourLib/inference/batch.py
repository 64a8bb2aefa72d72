"""Archive-scale contouring: ``mmcontour predict --manifest CSV --out DIR``.

Every case of the manifest (``data.manifest`` columns; a free-text ``note`` column, when present and
filled, adds to the structured fields and must agree with them) is contoured with one ``Contourer`` (the LLM is
loaded once per process, and not at all when every output exists) into ``DIR/<case_id>.seg.nrrd``.
A case that fails is reported and the others go on; ``DIR/summary.json`` lists every case with its
status, error, timings and volume, and is rewritten after each case so progress survives a crash.

Under ``torchrun --nproc_per_node N`` each process takes the cases ``i % WORLD_SIZE == RANK`` on
its own GPU (``cuda:LOCAL_RANK``), writes ``summary.rank<R>.json``, and the last one to finish
merges them into ``summary.json``. No process group is needed: the processes share nothing but
the output folder.

The same engine runs ``Resources/scripts/mmcontour_batch.py`` (headless through Slicer's Python):
``data.manifest.read_manifest(..., check=True)`` then ``contour_manifest(...)``, which take plain arguments.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from ..data.manifest import note_for
from ..image.fileio import write_json

SUMMARY_NAME = "summary.json"


def output_path(out_dir: str | os.PathLike, case_id: str) -> Path:
    return Path(out_dir) / f"{case_id}.seg.nrrd"


def pending(rows: list[dict[str, str]], out_dir: str | os.PathLike, overwrite: bool = False,
            bundle_id: str | None = None, structures: str | None = None) -> list[dict[str, str]]:
    """The rows that still need contouring (all of them with ``overwrite``): no output yet, or one made
    from another note, bundle or ``structures`` mode (``stale``)."""
    return [row for row in rows if overwrite or not output_path(out_dir, row["case_id"]).exists()
            or stale(row, output_path(out_dir, row["case_id"]), bundle_id, structures)]


def made_with(out: Path) -> dict[str, str]:
    """The prompt, bundle id and structures mode an output was made with: its ``MMContour_`` attributes
    (header only)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {k: reader.GetMetaData(f"MMContour_{k}") for k in ("prompt", "bundle_id", "structures")
            if reader.HasMetaDataKey(f"MMContour_{k}")}


def stale(row: dict[str, str], out: Path, bundle_id: str | None = None, structures: str | None = None) -> str:
    """Why the existing ``out`` does not answer ``row`` now ('' when it does): the note (so the prompt),
    the bundle or the ``structures`` mode changed since it was made (an output recording no mode, made
    before there were modes, counts as any), or it records no prompt (not ours, or damaged)."""
    made = made_with(out)
    if "prompt" not in made:
        return "unrecorded"
    try:
        prompt = note_for(row).to_prompt()
    except ValueError:  # NoteError, ContradictionError, NoteReadingError: running the case reports it
        return "note changed"
    if made["prompt"] != prompt:
        return "note changed"
    if bundle_id and made.get("bundle_id") != bundle_id:
        return "bundle changed"
    if structures and made.get("structures", structures) != structures:
        return "structures changed"
    return ""


def shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}")
    return rank, world, local


def device_for(requested: str, world: int, local_rank: int) -> str:
    """Under torchrun (``world`` > 1) ``auto`` / ``cuda`` become this process's own GPU."""
    if world <= 1:
        return requested
    from ..model.device import resolve_device

    return str(resolve_device(requested, local_rank))


def my_share(rows: list, rank: int, world: int) -> list[tuple[int, dict[str, str]]]:
    """(position in the manifest, row) of the cases process ``rank`` of ``world`` contours."""
    return [(i, row) for i, row in enumerate(rows) if i % world == rank]


def run_id(world: int) -> str:
    """Identifies this torchrun launch, so that parts left by an earlier run are never merged in."""
    env = os.environ.get
    if world == 1:
        return "single"
    return f"{env('TORCHELASTIC_RUN_ID', '')}@{env('MASTER_ADDR', '')}:{env('MASTER_PORT', '')}"


def _prompt_for(row: dict[str, str]) -> dict[str, str]:
    try:
        return {"prompt": note_for(row).to_prompt()}
    except ValueError:  # NoteError, ContradictionError
        return {}


def contour_case(contourer, row: dict[str, str], out_dir: Path, overwrite: bool, score: bool = False,
                 bundle_id: str | None = None, structures: str = "both") -> dict:
    """Contour one manifest row; never raises for a problem with the case itself. ``score``: with a
    ``ctv`` in the row, add the Dice of the contour against it (a CTV that cannot be read fails the
    case before its output is written). ``structures``: the segments written (``ContourResult.segments``
    mode: both, regions, union); the entry lists every structure (name, volume in cc, called for by the
    note, flags). An existing output is kept only while it was made from this note's prompt, this
    ``structures`` mode (and ``bundle_id``, when given); else the case is redone (status "redone: ...")."""
    from ..image.readwrite import read_image, write_segmentation
    from ..image.metrics import dice

    out = output_path(out_dir, row["case_id"])
    entry: dict = {"case_id": row["case_id"], "ct": row.get("ct", ""), "out": str(out)}
    redone = ""
    if out.exists() and not overwrite:
        redone = stale(row, out, bundle_id, structures)
        if not redone:
            return {**entry, "status": "skipped", "error": f"{out.name} exists (pass --overwrite to replace it)",
                    **_prompt_for(row)}
        if redone == "unrecorded":
            return {**entry, "status": "failed", "error": f"{out.name} exists but does not record the note it was "
                    "made from (not an MMContour output, or damaged); pass --overwrite to replace it",
                    **_prompt_for(row)}
        entry["previous"] = made_with(out)
    start = time.perf_counter()
    stage = "note"
    scores = {}
    try:
        note = note_for(row)
        entry["prompt"] = note.to_prompt()
        stage = "read CT"
        if not row.get("ct"):
            raise ValueError("the manifest gives no CT path")
        image = read_image(row["ct"])
        stage = "contour"
        result = contourer.contour(image, note)
        if score and row.get("ctv"):
            stage = "Dice against the CTV"
            scores["dice"] = round(dice(result.mask, read_image(row["ctv"])), 4)
        stage = "write"
        segments = result.segments(structures)
        write_segmentation(out, segments, sides={"CTV": note.side},
                           attributes={**result.provenance, "case_id": row["case_id"], "structures": structures})
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one bad case must not stop an archive run
        detail = str(exc).strip() or exc.__class__.__name__
        return {**entry, "status": "failed", "error": f"{stage}: {exc.__class__.__name__}: {detail}",
                "traceback": traceback.format_exc(limit=4), "seconds": round(time.perf_counter() - start, 3)}
    return {**entry, "status": f"redone: {redone}" if redone else "ok", "error": "", "prompt": result.prompt, "voxels": result.voxels,
            "volume_cc": round(result.volume_cc, 2), **scores, "structures_mode": structures,
            "segments": list(segments), "structures": result.structure_summary(), "windows": result.windows,
            "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
            "seconds": round(time.perf_counter() - start, 3)}


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, default=str)


def _counts(cases: list[dict]) -> dict[str, int]:
    """A redone case ("redone: note changed") counts as ok."""
    return {s: sum(c["status"].split(":")[0].replace("redone", "ok") == s for c in cases)
            for s in ("ok", "failed", "skipped")}


def _merge_if_complete(out_dir: Path, run: str, world: int) -> Path | None:
    """Whichever process finishes last finds every rank's part and writes summary.json."""
    parts = []
    for r in range(world):
        part = out_dir / f"summary.rank{r}.json"
        try:
            data = json.loads(part.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("run") != run or data.get("status") in ("running", "interrupted"):
            return None  # a part left by an earlier run, or one still being written: that rank has not finished
        parts.append(data)
    cases = sorted((c for p in parts for c in p["cases"]), key=lambda c: c["order"])
    counts = _counts(cases)
    merged = {**{k: parts[0][k] for k in ("manifest", "bundle", "run", "world_size")},
              "structures_mode": parts[0].get("structures_mode"),
              "status": "failed" if counts["failed"] else "ok", "cases_total": len(cases), **counts,
              "seconds_per_rank": [p["seconds"] for p in parts],
              "model_load_s_per_rank": [p["model_load_s"] for p in parts], "cases": cases}
    target = out_dir / SUMMARY_NAME
    _write_json(target, merged)
    return target


def contour_manifest(rows: list[dict[str, str]], out_dir: str | os.PathLike, load_model: Callable[[], object], *,
                     overwrite: bool = False, stop_on_error: bool = False, score: bool = False,
                     rank: int = 0, world: int = 1, run: str = "single", info: dict | None = None,
                     summary_view: Callable[[dict], dict] | None = None,
                     on_case: Callable[[int, int, dict], None] | None = None, bundle_id: str | None = None,
                     structures: str = "both") -> dict:
    """Contour this process's share of ``rows`` (from ``read_manifest``) into ``out_dir``; returns the report.

    ``load_model()`` returns the ``Contourer``; it is called once, and only when some case needs work
    (its errors propagate: they are not a case's). ``rank``/``world``: this process takes the rows
    ``i % world == rank`` and writes ``summary.rank<rank>.json`` (merged by the last rank to finish);
    alone it writes ``summary.json``, whose content is ``summary_view(report)`` when given (default:
    the report). The summary is rewritten after each case (``status`` "running"); an interrupt writes
    it with status "interrupted" and is re-raised. ``info`` (e.g. manifest, bundle) heads the report.
    ``on_case(position, total, entry)`` is called after each case; ``stop_on_error`` ends the run at
    the first failed case; ``score`` adds a Dice per case that has a ``ctv``. ``bundle_id``: the bundle
    ``load_model`` loads, so that an output made by another bundle is redone (else the loaded one's).
    ``structures``: the segments each output holds (both, regions, union; ``contour_case``)."""
    out_dir = Path(out_dir)
    mine = my_share(rows, rank, world)
    start = time.perf_counter()
    contourer, model_load_s = None, 0.0
    if structures not in ("both", "regions", "union"):
        raise ValueError(f"structures {structures!r}: use one of both, regions, union")
    if pending([row for _, row in mine], out_dir, overwrite, bundle_id, structures):
        contourer = load_model()
        contourer.cache_features = "off"  # every CT is seen once: keeping its features would only cost memory
        model_load_s = time.perf_counter() - start
        bundle_id = bundle_id or contourer.provenance("").get("bundle_id")
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = contourer is not None
    report = {**(info or {}), "run": run, "rank": rank, "world_size": world, "structures_mode": structures,
              "device": str(contourer.device) if loaded else None,
              "model": {k: v for k, v in contourer.provenance("").items() if k != "prompt"} if loaded else {},
              "model_load_s": round(model_load_s, 3), "status": "running", "cases": []}
    target = out_dir / (f"summary.rank{rank}.json" if world > 1 else SUMMARY_NAME)

    def write(status: str) -> None:
        cases = report.pop("cases")
        failed = [c["case_id"] for c in cases if c["status"] == "failed"]
        report.update(status=status if status != "done" else ("failed" if failed else "ok"),
                      seconds=round(time.perf_counter() - start, 3),
                      llm_calls=contourer.llm_calls if contourer is not None else 0,
                      cases_total=len(mine), **_counts(cases), failed_cases=failed)
        report["cases"] = cases  # last, after the counts
        _write_json(target, report if summary_view is None or world > 1 else summary_view(report))

    try:
        for position, (order, row) in enumerate(mine, start=1):
            entry = {"order": order, "rank": rank,
                     **contour_case(contourer, row, out_dir, overwrite, score=score, bundle_id=bundle_id,
                                    structures=structures)}
            report["cases"].append(entry)
            write("running")
            if on_case is not None:
                on_case(position, len(mine), entry)
            if entry["status"] == "failed" and stop_on_error:
                break
    except KeyboardInterrupt:
        write("interrupted")
        raise
    write("done")
    if world > 1:
        merged = _merge_if_complete(out_dir, run, world)
        report["summary"] = str(merged or target)
    else:
        report["summary"] = str(target)
    return report


__all__ = ["output_path", "pending", "made_with", "stale", "shard", "my_share", "contour_case",
           "contour_manifest"]
