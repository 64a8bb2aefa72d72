"""Where the model runs and in which precision: one answer for contouring, training and the benches."""
from __future__ import annotations

import contextlib

import torch

#: U-Net precision names; None: bf16 on a GPU that has it, else fp16 (with loss scaling in training)
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """A device that this machine does not have."""


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: the GPU when PyTorch sees one, else the CPU. ``local_rank`` (a torchrun process):
    ``auto`` and ``cuda`` mean this process's own GPU, ``cuda:LOCAL_RANK``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return torch.device(device)


def half_dtype() -> torch.dtype:
    """The GPU's 16-bit type: bf16 where supported (no loss scaling needed), else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype autocast computes in, or None for plain fp32: auto is 16-bit on a GPU, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype is None:
        dtype = half_dtype()
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def autocast_context(device: torch.device, precision: str = "auto"):
    """Mixed precision for the U-Net (``autocast_dtype``); a no-op context for fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
