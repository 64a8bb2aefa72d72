"""Atomic, verified file writes: a reader never sees a half-written file, a failure leaves nothing behind.

Every writer of the package goes through ``atomic_write``: it writes a temp file beside the target,
flushes it to disk, checks it (the size must be what was written; a writer-specific ``verify`` re-reads
it, because some writers do not report a short write on a full disk), then renames it into place.
``OutputGroup`` does the same for the several files of one run: all are written and verified first,
then renamed together, so a failure in any leaves none of them.

Temp files are named ``.<target>.mmcontour-tmp.<host>.<pid>.<random><suffix>``: a later run on the same
host removes the ones whose process is gone (a kill -9 in the middle of a write).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")
_TAG = ".mmcontour-tmp."
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteError(OSError):
    """A file could not be written whole (full disk, quota, read-only folder, a short write)."""


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(_DOUBLE_SUFFIXES) else path.suffix


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temp files (or folders) that an interrupted process on this host left in ``folder``
    (for target ``name`` only, when given); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    prefix = f".{name}{_TAG}" if name else "."
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix) or _TAG not in entry.name:
            continue
        tail = entry.name.split(_TAG, 1)[1].split(".")
        if len(tail) < 2 or tail[0] != _host() or not tail[1].isdigit() or _alive(int(tail[1])):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temp_path(path: Path, directory: bool = False) -> Path:
    """A new temp file (or folder) beside ``path``, named so that ``remove_stale_temps`` knows it."""
    prefix = f".{path.name}{_TAG}{_host()}.{os.getpid()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: what we write is shared like any file
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=_suffix(path), dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~current_umask())  # mkstemp makes 0600
    return Path(name)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def explain_write_error(exc: OSError, path: Path) -> WriteError:
    """The WriteError to show for ``exc`` while writing ``path`` (full disk, read-only folder, ...)."""
    if exc.errno in _NO_SPACE:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return WriteError(exc.errno, f"cannot write {path}: the disk is full ({free / 2**20:.1f} MiB free); "
                                     "free space or choose another output folder. Nothing was written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(exc.errno, f"cannot write {path}: the folder is not writable ({exc.strerror}); "
                                     "choose another output folder. Nothing was written")
    low = path.parent.exists() and shutil.disk_usage(path.parent).free < 64 * 2**20
    hint = " (the disk is nearly full)" if low else ""
    return WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}{hint}. Nothing was written")


def _sync(tmp: Path) -> None:
    if tmp.is_dir():
        for child in tmp.iterdir():
            _sync(child)
        return
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())


def stage(path: str | os.PathLike, write: Callable[[Path], None],
          verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``path``'s content to a verified temp file beside it and return the temp path (not renamed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)
        tmp = temp_path(path)
    except OSError as exc:
        raise explain_write_error(exc, path) from None
    try:
        try:
            write(tmp)
            _sync(tmp)
        except OSError as exc:
            raise explain_write_error(exc, path) from None
        except RuntimeError as exc:  # SimpleITK reports its I/O errors (a short write on a full disk) so
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "the writer failed"
            raise explain_write_error(OSError(errno.EIO, reason), path) from None
        if tmp.stat().st_size == 0:
            raise WriteError(errno.EIO, f"cannot write {path}: the writer produced an empty file. Nothing was written")
        if verify is not None:
            try:
                verify(tmp)
            except Exception as exc:  # the file on disk is not what was meant: never rename it into place
                raise WriteError(errno.EIO, f"cannot write {path}: what reached the disk does not read back "
                                            f"({exc}); the disk may be full. Nothing was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (same suffixes, so format-by-extension writers
    work), flush it to disk (a checkpoint must survive a power cut, not only a kill), check it
    (``verify(tmp)`` may re-read it), then rename it into place."""
    path = Path(path)
    tmp = stage(path, write, verify)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise explain_write_error(exc, path) from None
    return path


class OutputGroup:
    """The outputs of one run, written all or none: ``add`` stages each (verified temp files), ``commit``
    renames them into place; leaving the ``with`` block with an error removes every staged file."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike, write: Callable[[Path], None],
            verify: Callable[[Path], None] | None = None) -> Path:
        path = Path(path)
        self._staged.append((stage(path, write, verify), path))
        return path

    def commit(self) -> list[Path]:
        done = []
        try:
            for tmp, path in self._staged:
                os.replace(tmp, path)
                done.append(path)
        except OSError as exc:
            raise explain_write_error(exc, path) from None
        finally:
            self.discard()
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> "OutputGroup":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None and self._staged:
            self.commit()
        self.discard()


def write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise OSError(errno.EIO, f"{tmp.stat().st_size} of {len(data)} bytes on disk")

    return atomic_write(path, lambda tmp: tmp.write_bytes(data), verify=verify)


def write_json(path: str | os.PathLike, data, **dumps) -> Path:
    return write_text(path, json.dumps(data, indent=2, **dumps) + "\n")
