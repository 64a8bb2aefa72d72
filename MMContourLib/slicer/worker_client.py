"""The client of the model worker (``slicer.worker``): plain Python (subprocess + reader threads), safe to
call from a GUI thread.

``send`` returns at once, ``poll`` returns the events that arrived (the Slicer widget calls it from a
QTimer), ``wait`` blocks (batch and tests). Cancel asks the worker to stop and, if it has not within
``grace_s``, kills the worker's whole process tree. A worker that dies (crash, out of memory, killed) is
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
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .worker import TERMINAL_EVENTS, WORKER_MODULE


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
