"""One Apply (or Compare notes) as a job: the CT volume node to the worker, its result into the scene.

``ContourJob`` drives a worker client by polling, so the GUI never blocks; the scene changes only when
the result is complete (``mrml.write_mask_to_segmentation``), so a cancelled or failed job writes
nothing. ``CtFileCache`` exports the CT once per change; ``masks_from_results`` and ``provenance_for``
turn the worker's per-note results into segments and node attributes.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import SimpleITK as sitk

from ..note.structures import UNION, segment_color, structure_for
from .mrml import SegmentationNotEmptyError, SegmentSpec, export_volume, result_colors, write_mask_to_segmentation
from .worker import SEGMENT_MODES
from .worker_client import poll_until


class WorkerConnection(Protocol):
    """What a job needs of a worker client (:class:`~MMContourLib.slicer.worker_client.WorkerClient`; tests pass fakes)."""

    def send(self, op: str, **fields) -> str: ...

    def cancel(self, request_id: str, grace_s: float = 3.0) -> None: ...

    def poll(self) -> list[dict]: ...


def short_note_label(note) -> str:
    """A few words that tell results apart in the Data module: 'N2 BCS left', 'N0 BCS left + N2 TM right'."""
    from ..note.clinical import note_from_any

    note = note_from_any(note)
    surgery = {"bcs": "BCS", "mastectomy": "TM"}
    return " + ".join(f"{s.n_stage} {surgery[s.surgery]} {s.side}" for s in note.sides)


def masks_from_results(results: Sequence[Mapping], single_name: str = "CTV") -> dict[str, SegmentSpec]:
    """Worker results (``mask_path``, ``segments``, ``prompt``, ``side``, ``provenance``) -> segments.

    One result: its ``segments`` (the CTV and/or one per structure, named as the structure table names
    them, e.g. 'CTVn_L1_L', in the table's colour with its terminology); a result without ``segments``
    (an older worker) is one segment 'CTV'. Several results (compare notes): one segment per note, the
    note's CTV, named by its prompt so the legend reads like paper Fig. 5."""
    specs: dict[str, SegmentSpec] = {}
    if len(results) == 1:
        result = results[0]
        tags = _note_tags(result)
        segments = result.get("segments") or [{"name": single_name, "path": result["mask_path"]}]
        for index, segment in enumerate(segments):
            name = str(segment["name"])
            row, side = structure_for(name)
            extra = {"structure": name} if row is not None and name != UNION else {}
            specs[name] = SegmentSpec(sitk.ReadImage(str(segment["path"])), segment_color(name, index),
                                      side or result.get("side"), {**tags, **extra})
        return specs
    colors = result_colors(len(results))
    for index, result in enumerate(results):
        mask = sitk.ReadImage(str(result["mask_path"]))
        label = str(result.get("prompt") or f"note {index + 1}")
        while label in specs:
            label += " (again)"
        specs[label] = SegmentSpec(mask, colors[index], result.get("side"), _note_tags(result))
    return specs


def _note_tags(result: Mapping) -> dict[str, str]:
    note = result.get("note", "")
    return {"prompt": str(result.get("prompt", "")),
            "note": json.dumps(note, sort_keys=True) if isinstance(note, dict) else str(note)}


def result_files(result: Mapping) -> set[str]:
    """Every file a worker result names (the CTV mask and the segments' masks)."""
    paths = {str(s["path"]) for s in result.get("segments") or () if s.get("path")}
    return paths | ({str(result["mask_path"])} if result.get("mask_path") else set())


def provenance_for(results: Sequence[Mapping]) -> dict[str, str]:
    """Node attributes for a set of results: shared provenance once, the prompts joined when they differ."""
    if not results:
        return {}
    first = dict(results[0].get("provenance") or {})
    if len(results) > 1:
        first["prompt"] = " | ".join(str(r.get("prompt", "")) for r in results)
        first["compared_notes"] = str(len(results))
    return {k: str(v) for k, v in first.items()}


class CtFileCache:
    """The CT as a file for the worker, rewritten only when the volume (or its transform) changed, so
    pressing Apply again after editing the note costs no export."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries: dict[str, tuple[tuple, Path]] = {}

    @staticmethod
    def _key(node) -> tuple:
        transform = node.GetParentTransformNode()
        image = node.GetImageData()
        return (node.GetMTime(), image.GetMTime() if image is not None else 0,
                transform.GetMTime() if transform is not None else 0)

    def path_for(self, node) -> Path:
        key = self._key(node)
        entry = self._entries.get(node.GetID())
        if entry is not None and entry[0] == key and entry[1].exists():
            return entry[1]
        path = export_volume(node, self.folder / f"ct-{node.GetID()}.nrrd")
        self._entries[node.GetID()] = (key, path)
        return path


class ContourJob:
    """One Apply (or Compare notes): a CT volume node and notes in, a segmentation node out, through a
    :class:`~MMContourLib.slicer.worker_client.WorkerClient`. Nothing blocks: ``start`` sends the request and
    ``poll`` (called from a timer) advances it. The scene changes only when the result is complete;
    a cancelled or failed job writes nothing.

    ``state``: 'running' -> 'done' | 'failed' | 'cancelled'. ``stage``/``done``/``total``: progress.
    ``segmentation_node``, ``error``, ``seconds``, ``results`` (worker's per-note results, each with its
    ``summary``: structures and review, shown by ``slicer.report``), ``loaded_model``. ``structures``: which
    segments one note gives (``worker.SEGMENT_MODES``: both = the CTV and one per structure drawn)."""

    def __init__(self, client: WorkerConnection, scene, ct_node, notes: Sequence, bundle: str, llm: str | None = None,
                 device: str = "auto", target_node=None, replace_confirmed: bool = False,
                 ct_cache: CtFileCache | None = None, workdir: str | os.PathLike | None = None,
                 name: str | None = None, request_options: Mapping | None = None, structures: str = "both"):
        if not notes:
            raise ValueError("no clinical note to contour with")
        if structures not in SEGMENT_MODES:
            raise ValueError(f"structures {structures!r}: use one of {', '.join(SEGMENT_MODES)}")
        self.structures = structures
        self.client, self.scene, self.ct_node = client, scene, ct_node
        from ..note.clinical import note_from_any

        self.notes = [note_from_any(n).to_fields() for n in notes]  # a bad note fails here, before any work
        self.bundle, self.llm, self.device = str(bundle), (str(llm) if llm else None), device or "auto"
        self.target_node, self.replace_confirmed, self.name = target_node, replace_confirmed, name
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mmcontour-"))
        self.ct_cache = ct_cache or CtFileCache(self.workdir)
        self.request_options = dict(request_options or {})
        self.state, self.stage, self.done, self.total = "new", "", 0, 0
        self.note_index, self.note_count = 0, len(self.notes)
        self.segmentation_node = None
        self.error: str | None = None
        self.error_detail: str = ""
        self.results: list[dict] = []
        self.loaded_model: bool | None = None
        self.request_id: str | None = None
        self._started = 0.0
        self.seconds = 0.0
        self._cancel_requested = False
        self._result_ready = False

    def start(self) -> "ContourJob":
        if self.target_node is not None and self.target_node.GetSegmentation().GetNumberOfSegments() \
                and not self.replace_confirmed:
            raise SegmentationNotEmptyError(
                f"segmentation '{self.target_node.GetName()}' already holds segments; confirm replacing them")
        self._started = time.perf_counter()
        ct_path = self.ct_cache.path_for(self.ct_node)  # an unusable CT fails here, before the job counts as running
        self.state, self.stage = "running", "read-ct"
        self.request_id = self.client.send("contour", ct=str(ct_path), notes=self.notes, bundle=self.bundle,
                                           llm=self.llm, device=self.device, out_dir=str(self.workdir),
                                           structures=self.structures if self.note_count == 1 else "union",
                                           **self.request_options)  # compare notes: one CTV per note
        return self

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def cancel(self, grace_s: float = 3.0) -> None:
        if self.state == "running" and self.request_id is not None:
            self._cancel_requested = True
            self.client.cancel(self.request_id, grace_s=grace_s)

    def poll(self, events: Sequence[dict] | None = None) -> list[dict]:
        """Advance with the worker's events (``events``: already polled by the caller, who may share the
        client with other requests; default: poll the client); returns the events that concerned this job."""
        if self.state != "running":
            return []
        if self._result_ready:  # one poll after the result: the GUI has shown "Writing result" meanwhile
            self._result_ready = False
            if self._cancel_requested:
                self.state = "cancelled"
            else:
                self._write()
            self._finish()
            return []
        mine = []
        for event in (self.client.poll() if events is None else events):
            if event.get("event") == "died" and self.request_id in (event.get("pending") or []):
                mine.append(event)
                continue
            if str(event.get("id", "")) != self.request_id:
                continue
            mine.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.stage, self.done, self.total = event.get("stage", ""), event.get("done", 0), event.get("total", 0)
                self.note_index = event.get("note_index", 0)
            elif kind == "result":
                self.results = list(event.get("results") or [])
                self.loaded_model = event.get("loaded_model")
                self.stage, self._result_ready = "write", True
            elif kind == "cancelled":
                self.state = "cancelled"
            elif kind == "error":
                self.state, self.error = "failed", event.get("message") or "contouring failed"
                self.error_detail = event.get("stderr_tail") or event.get("traceback") or ""
        self._finish()
        return mine

    def _finish(self) -> None:
        if self.finished:
            self.seconds = time.perf_counter() - self._started
            self._remove_masks()

    def _write(self) -> None:
        try:
            specs = masks_from_results(self.results)
            provenance = provenance_for(self.results)
            provenance.setdefault("bundle", self.bundle)
            name = self.name or (f"{self.ct_node.GetName()} CTV ({short_note_label(self.notes[0])})"
                                 if len(self.results) == 1 else f"{self.ct_node.GetName()} CTV by note")
            self.segmentation_node = write_mask_to_segmentation(
                self.scene, self.ct_node, specs, provenance, target_node=self.target_node,
                replace_confirmed=self.replace_confirmed, name=name)
            self.state = "done"
        except Exception as exc:  # reported to the user; the scene is unchanged (see write_mask_to_segmentation)
            self.state, self.error = "failed", f"could not write the segmentation: {exc}"

    def _remove_masks(self) -> None:
        for result in self.results:
            for path in result_files(result):
                Path(path).unlink(missing_ok=True)

    def wait(self, timeout: float | None = None, on_event=None) -> "ContourJob":
        """Poll until finished (batch scripts and tests; a GUI polls from a timer instead)."""
        poll_until(lambda: self.finished, self.poll, timeout, on_event, what="contouring")
        return self


__all__ = ["ContourJob", "CtFileCache", "WorkerConnection", "masks_from_results", "provenance_for",
           "result_files", "short_note_label"]
