"""A long-lived inference process that keeps the model warm.

Why a process: Slicer's GUI must never freeze, Cancel must always work (even inside a long LLM or
CUDA call), and a crash or out-of-memory must not take Slicer down. Why long-lived: loading the LLM
and the U-Net is the slow part; editing the note and pressing Apply again must not reload them.

Protocol (one JSON object per line; ``python -m MMContourLib.slicer.worker``)::

    stdin  {"id": "7", "op": "contour", "ct": "/tmp/ct.nrrd", "notes": ["N1, bcs, left side"],
            "bundle": "B", "llm": null, "device": "auto", "out_dir": "/tmp/out", "structures": "both"}
           {"id": "8", "op": "load", "bundle": "B", "llm": null, "device": "auto"}
           {"id": "9", "op": "info"}
           {"op": "cancel", "id": "7"}          # cooperative: the run stops at the next window
           {"op": "shutdown"}
    stdout {"event": "ready", "pid": 123, "protocol": 1}
           {"id": "7", "event": "progress", "stage": "windows", "done": 3, "total": 12, "note_index": 0, "notes": 1}
           {"id": "7", "event": "result", "results": [{"mask_path": ..., "prompt": ..., "provenance": {...},
            "segments": [{"name": "CTV", "path": ...}, {"name": "CTVn_L1_L", "path": ...}],
            "summary": {...}, "timings": {...}}], "loaded_model": false, "seconds": 1.9}

``structures`` ("both" | "regions" | "union", ``inference.contourer.SEGMENT_MODES``) chooses the segments
of each result (``ContourResult.segments``): both = the CTV then one per structure drawn. ``mask_path``
is always the CTV (the union); ``summary`` is ``ContourResult.summary()`` (structures, review).
           {"id": "7", "event": "error", "message": "...", "kind": "NoteError"}
           {"id": "7", "event": "cancelled"}

Only the protocol goes to stdout: the worker moves file descriptor 1 to stderr at start, so a
library that prints (or a C extension that writes to fd 1) cannot corrupt it. stderr is the log.

The client that starts and drives it is ``slicer.worker_client.WorkerClient``.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

if TYPE_CHECKING:  # annotations only: the Slicer GUI imports this module, which must stay cheap
    import SimpleITK as sitk

    from ..model.bundle import ModelBundle
    from ..note.clinical import ClinicalNote

PROTOCOL = 1
#: What ``WorkerClient`` runs with ``python -m``.
WORKER_MODULE = "MMContourLib.slicer.worker"
TERMINAL_EVENTS = ("result", "error", "cancelled", "loaded", "info", "pong")
#: ``structures`` of a contour request (the same names as ``inference.contourer.SEGMENT_MODES``, which this
#: module cannot import at Slicer start: Testing/test_worker.py checks they are equal).
SEGMENT_MODES = ("both", "regions", "union")
#: The Contourer's stages plus the worker's own; the GUI shows these names.
STAGE_LABELS = {
    "load-model": "Loading model", "read-ct": "Reading CT", "preprocess": "Preparing CT",
    "encode-note": "Encoding note", "windows": "Contouring", "postprocess": "Resampling to the CT grid",
    "write": "Writing result",
}


# ================================================================================================
# Server (runs in the worker process)
# ================================================================================================

Progress = Callable[[str, int, int], None]


class ContourOutcome(Protocol):
    """One contour as the worker reports it (``inference.contourer.ContourResult``). Its ``segments(mode)``
    and ``summary()`` are sent when it has them; without them the result is the CTV alone."""

    mask: "sitk.Image"
    note: "ClinicalNote"
    prompt: str
    provenance: dict[str, str]
    timings: dict[str, float]


class WarmContourer(Protocol):
    """What the worker keeps loaded between requests (``inference.contourer.Contourer``)."""

    device: object  # reported as str()

    @property
    def llm_calls(self) -> int: ...

    def provenance(self, prompt: str) -> dict[str, str]: ...

    def contour(self, image: "sitk.Image", note: "ClinicalNote | str", progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None) -> ContourOutcome: ...


class ContourerFactory(Protocol):
    """Builds the warm model from a loaded bundle (``Contourer`` itself; the cancel tests pass a slow one)."""

    def __call__(self, bundle: "ModelBundle", *, llm: str | None, device: str) -> WarmContourer: ...


def _default_contourer_factory() -> ContourerFactory:
    from ..inference.contourer import Contourer

    return Contourer


class _Server:
    def __init__(self, out, contourer_factory: ContourerFactory | None = None):
        self._out = out
        self._contourer_factory = contourer_factory
        self._out_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._contourer: WarmContourer | None = None
        self._contourer_key: tuple | None = None
        self._ct_cache: tuple[tuple, object] | None = None
        self.loads = 0

    # -- io ----------------------------------------------------------------------------------------
    def emit(self, **event) -> None:
        line = json.dumps(event, default=str)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def _read_stdin(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                self.emit(event="error", message=f"request is not JSON: {exc}", kind="ProtocolError")
                continue
            if request.get("op") == "cancel":
                with self._cancel_lock:
                    self._cancelled.add(str(request.get("id")))
                continue
            self._requests.put(request)
        # stdin closed: the client (Slicer) is gone; stop whatever runs and exit
        with self._cancel_lock:
            self._cancelled.add("*")
        self._requests.put({"op": "shutdown"})

    def is_cancelled(self, request_id: str) -> bool:
        with self._cancel_lock:
            return request_id in self._cancelled or "*" in self._cancelled

    # -- main loop ---------------------------------------------------------------------------------
    def serve(self, stdin) -> None:
        threading.Thread(target=self._read_stdin, args=(stdin,), daemon=True, name="stdin").start()
        self.emit(event="ready", pid=os.getpid(), protocol=PROTOCOL, python=sys.executable)
        while True:
            request = self._requests.get()
            op = request.get("op")
            rid = str(request.get("id", ""))
            if op == "shutdown":
                return
            handler = {"contour": self._contour, "load": self._load, "info": self._info,
                       "ping": lambda r: self.emit(id=rid, event="pong")}.get(op)
            if handler is None:
                self.emit(id=rid, event="error", message=f"unknown op {op!r}", kind="ProtocolError")
                continue
            try:
                handler(request)
            except _Cancel:
                self.emit(id=rid, event="cancelled")
            except Exception as exc:  # every failure is reported; the worker stays up for the next request
                cancelled_type = _cancelled_type()
                if cancelled_type is not None and isinstance(exc, cancelled_type):
                    self.emit(id=rid, event="cancelled")
                else:
                    traceback.print_exc(file=sys.stderr)
                    self.emit(id=rid, event="error", message=str(exc) or type(exc).__name__,
                              kind=type(exc).__name__, traceback=traceback.format_exc(limit=8))
            finally:
                with self._cancel_lock:
                    self._cancelled.discard(rid)

    # -- ops -----------------------------------------------------------------------------------------
    def _ensure_contourer(self, request, progress) -> bool:
        """The Contourer for (bundle, llm, device), loading it only when that changed; True if loaded now."""
        from ..model.bundle import ModelBundle

        bundle = str(Path(request["bundle"]).expanduser().resolve())
        llm = request.get("llm") or None
        device = request.get("device") or "auto"
        key = (bundle, llm, device)
        if self._contourer is not None and self._contourer_key == key:
            return False
        progress("load-model", 0, 1)
        bundle_files = ModelBundle.load(bundle)  # a missing or damaged bundle fails here, keeping the warm model
        self._contourer = self._contourer_key = None  # free the old model before building the new one
        factory = self._contourer_factory or _default_contourer_factory()
        self._contourer = factory(bundle_files, llm=llm, device=device)
        self._contourer_key = key
        self.loads += 1
        progress("load-model", 1, 1)
        return True

    def _model_summary(self) -> dict:
        """What the client learns about the warm model: how often it was loaded, LLM passes, provenance."""
        c = self._contourer
        if c is None:
            return {"loads": self.loads, "llm_calls": None, "device": ""}
        return {"loads": self.loads, "llm_calls": c.llm_calls, "device": str(c.device),
                "model": {k: v for k, v in c.provenance("").items() if k != "prompt"}}

    def _load(self, request) -> None:
        rid = str(request.get("id", ""))
        start = time.perf_counter()
        loaded = self._ensure_contourer(request, self._progress_fn(rid))
        self.emit(id=rid, event="loaded", loaded_model=loaded, seconds=time.perf_counter() - start,
                  **self._model_summary())

    def _info(self, request) -> None:
        self.emit(id=str(request.get("id", "")), event="info", **device_info())

    def _read_ct(self, path: str):
        from ..image.readwrite import read_image

        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
        if self._ct_cache is not None and self._ct_cache[0] == key:
            return self._ct_cache[1]
        image = read_image(path)
        self._ct_cache = (key, image)
        return image

    def _progress_fn(self, rid: str, note_index: int = 0, notes: int = 1) -> Progress:
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            if self.is_cancelled(rid):
                raise _Cancel()
            now = time.perf_counter()
            if done in (0, total) or now - last[0] > 0.1:  # at most ~10 events/s per stage
                last[0] = now
                self.emit(id=rid, event="progress", stage=stage, done=done, total=total,
                          note_index=note_index, notes=notes)
        return progress

    def _contour(self, request) -> None:
        import SimpleITK as sitk

        rid = str(request.get("id", ""))
        notes = request.get("notes") or ([request["note"]] if request.get("note") else [])
        if not notes:
            raise ValueError("the contour request has no note")
        mode = request.get("structures") or "both"
        if mode not in SEGMENT_MODES:  # before any work: a typo must not cost a model load
            raise ValueError(f"structures {mode!r}: use one of {', '.join(SEGMENT_MODES)}")
        out_dir = Path(request.get("out_dir") or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        loaded = self._ensure_contourer(request, self._progress_fn(rid))
        progress = self._progress_fn(rid)
        progress("read-ct", 0, 1)
        image = self._read_ct(request["ct"])
        progress("read-ct", 1, 1)
        results, written = [], []
        try:
            for index, note in enumerate(notes):
                if isinstance(note, dict):  # the form's structured fields: nothing lost to free-text parsing
                    from ..note.clinical import ClinicalNote
                    note = ClinicalNote.from_fields(**note)
                progress = self._progress_fn(rid, index, len(notes))
                r = self._contourer.contour(image, note, progress=progress, cancel=lambda: self.is_cancelled(rid))
                mask_path = out_dir / f"mask-{rid}-{index}.nrrd"
                t = time.perf_counter()
                sitk.WriteImage(r.mask, str(mask_path), True)
                written.append(mask_path)
                segments = []
                for number, (name, mask) in enumerate(_segments_of(r, mode).items()):
                    if mask is r.mask:  # the CTV: already written
                        segments.append({"name": name, "path": str(mask_path)})
                        continue
                    path = out_dir / f"mask-{rid}-{index}-{number}.nrrd"
                    sitk.WriteImage(mask, str(path), True)
                    written.append(path)
                    segments.append({"name": name, "path": str(path)})
                timings = {**r.timings, "write-mask": time.perf_counter() - t}
                results.append({"note": r.note.to_fields(), "prompt": r.prompt, "side": r.note.side,
                                "mask_path": str(mask_path), "voxels": int(sitk.GetArrayViewFromImage(r.mask).sum()),
                                "segments": segments, "structures": mode, "summary": _summary_of(r),
                                "provenance": {**(r.provenance or {}), "bundle": self._contourer_key[0]},
                                "timings": timings})
            if self.is_cancelled(rid):
                raise _Cancel()
        except BaseException:
            for path in written:  # a cancelled or failed run leaves no files behind
                path.unlink(missing_ok=True)
            raise
        self.emit(id=rid, event="result", results=results, loaded_model=loaded,
                  seconds=time.perf_counter() - start, **self._model_summary())


def _segments_of(result, mode: str) -> dict:
    """The segments of one result for ``mode`` (``ContourResult.segments``); an outcome without them: the CTV."""
    segments = getattr(result, "segments", None)
    return segments(mode) if callable(segments) else {"CTV": result.mask}


def _summary_of(result) -> dict:
    """``ContourResult.summary()`` made JSON-safe (numbers from numpy become floats); {} if it has none."""
    summary = getattr(result, "summary", None)
    return json.loads(json.dumps(summary(), default=_plain)) if callable(summary) else {}


def _plain(value):
    try:
        return value.item()  # numpy scalars
    except (AttributeError, ValueError):
        return value.tolist() if hasattr(value, "tolist") else str(value)


class _Cancel(Exception):
    pass


def _cancelled_type():
    try:
        from ..inference.contourer import Cancelled
        return Cancelled
    except Exception:
        return None


def device_info() -> dict:
    """What the device combo box shows: torch version, GPUs with free/total memory, Apple MPS."""
    info: dict = {"cuda": False, "gpus": [], "mps": False}
    try:
        import torch
    except ImportError as exc:
        info["error"] = f"PyTorch is not installed: {exc}"
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["cuda"] = True
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            info["gpus"].append({"index": index, "name": torch.cuda.get_device_name(index),
                                 "free_bytes": int(free), "total_bytes": int(total)})
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps and mps.is_available())
    return info


def main(argv: Iterable[str] | None = None, contourer_factory: ContourerFactory | None = None) -> int:
    # The protocol gets a private copy of stdout; fd 1 itself becomes stderr, so stray prints go to the log.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    server = _Server(out, contourer_factory)
    try:
        server.serve(sys.stdin)
    finally:
        out.flush()
        sys.stderr.flush()
    # Nothing is left to save; skipping interpreter teardown (torch, CUDA) makes Cancel/close prompt.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
