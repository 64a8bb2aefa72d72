"""A long-lived inference process that keeps the model warm, and the client that drives it.

Why a process: Slicer's GUI must never freeze, Cancel must always work (even inside a long LLM or
CUDA call), and a crash or out-of-memory must not take Slicer down. Why long-lived: loading the LLM
and the U-Net is the slow part; editing the note and pressing Apply again must not reload them.

Protocol (one JSON object per line; ``python -m MMContourLib.slicer.worker``)::

    stdin  {"id": "7", "op": "contour", "ct": "/tmp/ct.nrrd", "notes": ["N1, bcs, left side"],
            "bundle": "B", "llm": null, "device": "auto", "out_dir": "/tmp/out"}
           {"id": "8", "op": "load", "bundle": "B", "llm": null, "device": "auto"}
           {"id": "9", "op": "info"}
           {"op": "cancel", "id": "7"}          # cooperative: the run stops at the next window
           {"op": "shutdown"}
    stdout {"event": "ready", "pid": 123, "protocol": 1}
           {"id": "7", "event": "progress", "stage": "windows", "done": 3, "total": 12, "note_index": 0, "notes": 1}
           {"id": "7", "event": "result", "results": [{"mask_path": ..., "prompt": ..., "provenance": {...},
            "timings": {...}}], "loaded_model": false, "seconds": 1.9}
           {"id": "7", "event": "error", "message": "...", "kind": "NoteError"}
           {"id": "7", "event": "cancelled"}

Only the protocol goes to stdout: the worker moves file descriptor 1 to stderr at start, so a
library that prints (or a C extension that writes to fd 1) cannot corrupt it. stderr is the log.

:class:`WorkerClient` is plain Python (subprocess + reader threads): ``send`` returns at once,
``poll`` returns the events that arrived (the Slicer widget calls it from a QTimer), ``wait``
blocks (batch and tests). Cancel asks the worker to stop and, if it has not within ``grace_s``,
kills the worker's whole process tree. A worker that dies (crash, out of memory, killed) is
reported with its exit status and the tail of its log; the next request starts a new one.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol

if TYPE_CHECKING:  # annotations only: the Slicer GUI imports this module, which must stay cheap
    import SimpleITK as sitk

    from ..model.bundle import ModelBundle
    from ..note.clinical import ClinicalNote

PROTOCOL = 1
#: What ``WorkerClient`` runs with ``python -m``.
WORKER_MODULE = "MMContourLib.slicer.worker"
TERMINAL_EVENTS = ("result", "error", "cancelled", "loaded", "info", "pong")
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
    """One contour as the worker reports it (``inference.contourer.ContourResult``)."""

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
                timings = {**r.timings, "write-mask": time.perf_counter() - t}
                results.append({"note": r.note.to_fields(), "prompt": r.prompt, "side": r.note.side,
                                "mask_path": str(mask_path), "voxels": int(sitk.GetArrayViewFromImage(r.mask).sum()),
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


# ================================================================================================
# Client (runs in Slicer or any Python)
# ================================================================================================

def explain_exit(returncode: int | None, stderr_tail: str = "") -> str:
    """A sentence a user can act on, from a worker's exit status and the end of its log."""
    tail = stderr_tail.lower()
    if "out of memory" in tail or "memoryerror" in tail or "cannot allocate memory" in tail:
        return ("the contouring process ran out of memory. Choose CPU if the GPU is too small, close other "
                "programs, or use a smaller LLM")
    if returncode is None:
        return "the contouring process stopped"
    if returncode < 0 or returncode in (137, 139):
        signum = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == getattr(signal, "SIGKILL", 9):
            return (f"the contouring process was killed ({name}); most often the system ran out of memory "
                    "(the kernel's OOM killer). Try CPU or a smaller model, or free memory")
        if signum == getattr(signal, "SIGSEGV", 11):
            return f"the contouring process crashed ({name}): a native library failed; see the log"
        return f"the contouring process was stopped by {name}"
    if sys.platform == "win32" and returncode in (0xC0000005, -1073741819):
        return "the contouring process crashed (access violation in a native library); see the log"
    if sys.platform == "win32" and returncode in (0xC0000017, -1073741801, 0xC000012D):
        return "the contouring process ran out of memory"
    return f"the contouring process exited with status {returncode}"


def poll_until(finished: Callable[[], bool], poll: Callable[[], Iterable[dict]], timeout: float | None = None,
               on_event: Callable[[dict], None] | None = None, what: str = "the request") -> None:
    """Call ``poll`` until ``finished()``, handing every event to ``on_event``: the blocking form of the
    GUI's poll timer (scripts, tests, ``WorkerClient.wait``, ``ContourJob.wait``). TimeoutError after
    ``timeout`` seconds names ``what``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for event in poll():
            if on_event is not None:
                on_event(event)
        if finished():
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout} s")
        time.sleep(0.02)


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill a worker started by WorkerClient and everything it started (its own process group)."""
    if process.poll() is not None:
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not get ignored
        process.kill()


class WorkerClient:
    """Starts and talks to ``python -m MMContourLib.slicer.worker``; safe to call from a GUI thread (never blocks
    except in :meth:`wait` and :meth:`close`)."""

    def __init__(self, python: str | None = None, pythonpath: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 log: Callable[[str], None] | None = None, stderr_lines: int = 200, module: str = WORKER_MODULE):
        self.python = python or sys.executable
        self.module = module  # run as ``python -m <module>``: this one, or one that calls main() with its own factory
        self.pythonpath = [str(p) for p in pythonpath] or [str(Path(__file__).resolve().parents[2])]
        self.env = dict(env or {})
        self.log = log
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._ids = itertools.count(1)
        self._pending: dict[str, int] = {}  # request id -> pid of the worker it was sent to
        self._cancel_deadlines: dict[str, float] = {}
        self._lock = threading.Lock()
        self.starts = 0
        self.ready: dict | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the worker if it is not running (called by send; cheap when it runs)."""
        if self.alive():
            return
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel can kill the whole tree
        self._stderr.clear()
        self.ready = None
        process = subprocess.Popen([self.python, "-m", self.module], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                   encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._process = process
        self.starts += 1
        threading.Thread(target=self._read_stdout, args=(process,), daemon=True, name="worker-stdout").start()
        threading.Thread(target=self._read_stderr, args=(process,), daemon=True, name="worker-stderr").start()

    def _read_stdout(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(f"[stdout] {line}")
                continue
            self._events.put(event)
        process.wait()
        time.sleep(0.05)  # let the stderr reader catch the last lines (the reason it died)
        self._events.put({"event": "exited", "returncode": process.returncode, "pid": process.pid})

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            line = line.rstrip("\n")
            self._stderr.append(line)
            if self.log is not None:
                try:
                    self.log(line)
                except Exception:
                    pass

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    # -- requests ----------------------------------------------------------------------------------
    def send(self, op: str, **fields) -> str:
        """Send a request (starting the worker if needed); returns its id. Events come from poll/wait."""
        self.start()
        rid = str(next(self._ids))
        message = json.dumps({"id": rid, "op": op, **fields}, default=str)
        with self._lock:
            self._pending[rid] = self._process.pid
        try:
            self._process.stdin.write(message + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker died; poll reports it for this request
        return rid

    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def cancel(self, request_id: str, grace_s: float = 3.0) -> None:
        """Ask the worker to stop ``request_id``; if it has not stopped after ``grace_s`` (stuck in a native
        call, or grace_s=0), kill its process tree. Nothing is written for a cancelled request."""
        with self._lock:
            if request_id not in self._pending:
                return
            self._cancel_deadlines[request_id] = time.monotonic() + grace_s
        if grace_s <= 0:
            self.kill()
            return
        try:
            self._process.stdin.write(json.dumps({"op": "cancel", "id": request_id}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError, AttributeError):
            self.kill()

    def kill(self) -> None:
        """Kill the worker and its children now (the model is lost; the next request starts a new worker)."""
        if self._process is not None:
            kill_process_tree(self._process)

    def poll(self) -> list[dict]:
        """Events that arrived since the last call, in order. Never blocks. A worker death turns into one
        'error' (or, if it was being cancelled, 'cancelled') event per pending request."""
        self._enforce_cancel_deadlines()
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.extend(self._handle(event))
        return events

    def _enforce_cancel_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [rid for rid, t in self._cancel_deadlines.items() if t <= now and rid in self._pending]
        if overdue:
            self.kill()

    def _handle(self, event: dict) -> list[dict]:
        kind = event.get("event")
        if kind == "ready":
            self.ready = event
            return [event]
        if kind == "exited":
            pid = event.get("pid")
            with self._lock:
                pending = [rid for rid, owner in self._pending.items() if owner == pid]
                cancelling = {rid for rid in pending if rid in self._cancel_deadlines}
                for rid in pending:
                    self._pending.pop(rid, None)
                    self._cancel_deadlines.pop(rid, None)
            if self._process is not None and pid != self._process.pid and not pending:
                return []  # an earlier worker's last words
            tail = self.stderr_tail()
            message = explain_exit(event.get("returncode"), tail)
            out = [{"event": "died", "returncode": event.get("returncode"), "message": message,
                    "stderr_tail": tail, "pending": pending, "pid": pid,
                    "cancelled": bool(pending) and cancelling == set(pending)}]
            for rid in pending:
                if rid in cancelling:
                    out.append({"id": rid, "event": "cancelled", "killed": True})
                else:
                    out.append({"id": rid, "event": "error", "message": message, "kind": "WorkerDied",
                                "stderr_tail": tail})
            return out
        rid = str(event.get("id", ""))
        if kind in TERMINAL_EVENTS:
            with self._lock:
                self._pending.pop(rid, None)
                self._cancel_deadlines.pop(rid, None)
        return [event]

    def wait(self, request_id: str, timeout: float | None = None,
             on_event: Callable[[dict], None] | None = None) -> dict:
        """Block until ``request_id`` ends; returns its terminal event (result/loaded/info/error/cancelled)."""
        ended: list[dict] = []

        def poll() -> list[dict]:
            events = self.poll()
            ended.extend(e for e in events if str(e.get("id", "")) == request_id and e.get("event") in TERMINAL_EVENTS)
            return events

        poll_until(lambda: bool(ended), poll, timeout, on_event, what=f"worker request {request_id}")
        return ended[0]

    def request(self, op: str, timeout: float | None = None, on_event=None, **fields) -> dict:
        """send + wait."""
        return self.wait(self.send(op, **fields), timeout=timeout, on_event=on_event)

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
                process.stdin.flush()
                process.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_process_tree(process)
        self._process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(main())
