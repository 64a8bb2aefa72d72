"""Atomic file writes: a reader never sees a half-written file, and a failure leaves nothing behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (same suffixes, so format-by-extension writers
    work), give it ordinary permissions (mkstemp makes 0600), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(_DOUBLE_SUFFIXES) else path.suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data, **dumps) -> Path:
    return write_text(path, json.dumps(data, indent=2, **dumps) + "\n")
