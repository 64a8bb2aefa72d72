"""What a NIfTI file really holds, checked before ITK reads it.

ITK's NIfTI reader fills the voxels a truncated file lacks with zeros, reads a gzip stream cut short
without complaint, and turns NaN into 0 -- so a half-copied CT, or one with undefined voxels, would be
contoured as if it were whole. ``check_nifti`` reads the header itself (NIfTI-1 or NIfTI-2, either byte
order), decompresses the whole stream (which checks gzip's length and CRC trailer), compares the voxel
bytes with what the header promises and counts non-finite values in the raw data.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: NIfTI datatype code -> numpy dtype (the codes ITK reads).
_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


class NiftiError(ValueError):
    """A NIfTI file that is damaged or holds values a CT cannot have; the message says which and what to do."""


@dataclass(frozen=True)
class NiftiInfo:
    shape: tuple[int, ...]       # (x, y, z, ...) as the header gives it
    dtype: str
    data_bytes: int              # voxel bytes in the file
    nonfinite: int               # NaN / infinite voxels in the raw data (0 for integer types)


def is_nifti(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith((".nii", ".nii.gz"))


def _read_all(path: Path) -> bytes:
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except EOFError:
            raise NiftiError(f"{path} is truncated: its gzip stream ends early (an interrupted copy or a full "
                             "disk?). Copy or export the CT again.") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise NiftiError(f"{path} is damaged: {exc}. Copy or export the CT again.") from None
    return path.read_bytes()


def _header(raw: bytes, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(byte order, dims, datatype, voxel offset) of a NIfTI-1 or NIfTI-2 header."""
    for order in ("<", ">"):
        if len(raw) >= 4 and struct.unpack(order + "i", raw[:4])[0] == 348 and len(raw) >= 352:
            dim = struct.unpack(order + "8h", raw[40:56])
            datatype = struct.unpack(order + "h", raw[70:72])[0]
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            return order, tuple(int(d) for d in dim[1:1 + max(0, min(dim[0], 7))]), datatype, max(offset, 352)
        if len(raw) >= 4 and struct.unpack(order + "i", raw[:4])[0] == 540 and len(raw) >= 544:
            dim = struct.unpack(order + "8q", raw[16:80])
            datatype = struct.unpack(order + "h", raw[12:14])[0]
            offset = int(struct.unpack(order + "q", raw[168:176])[0])
            return order, tuple(int(d) for d in dim[1:1 + max(0, min(dim[0], 7))]), datatype, max(offset, 544)
    raise NiftiError(f"{path} has no NIfTI header (the file is not NIfTI, or its start is damaged)")


def check_nifti(path: str | os.PathLike) -> NiftiInfo:
    """Raise NiftiError for a truncated or damaged NIfTI file; return what it holds."""
    path = Path(path)
    raw = _read_all(path)
    order, shape, datatype, offset = _header(raw, path)
    if datatype not in _DTYPES:
        raise NiftiError(f"{path} stores voxels as NIfTI datatype {datatype}, which is not a CT's "
                         "(integers or floating point)")
    dtype = np.dtype(order + _DTYPES[datatype])
    promised = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    held = len(raw) - offset
    if held < promised:
        raise NiftiError(f"{path} is truncated: the header promises {promised} bytes of voxels "
                         f"({'x'.join(map(str, shape))}), the file holds {max(held, 0)}. Copy or export the CT again.")
    nonfinite = 0
    if dtype.kind == "f":
        data = np.frombuffer(raw, dtype=dtype, count=promised // dtype.itemsize, offset=offset)
        nonfinite = int(data.size - np.count_nonzero(np.isfinite(data)))
    return NiftiInfo(shape=shape, dtype=dtype.str, data_bytes=held, nonfinite=nonfinite)
