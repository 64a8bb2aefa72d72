"""Sliding window over the U-Net: a whole volume's foreground probability, window by window.

One implementation for contouring (``Contourer``, with its per-window feature cache), validation
during training, and the benchmark's reference loop (``note_per_window``: the LLM runs again for
every window, as the LLMSeg reference code does). MONAI's ``sliding_window_inference`` visits the
windows with Gaussian blending and zero padding; what is blended is the softmax foreground
probability, so validation scores exactly what contouring draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .device import autocast_context

Features = list[torch.Tensor]


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding_window_inference visits for an image of ``shape`` (after its padding)."""
    total = 1
    for s, r in zip(shape, roi):
        s = max(s, r)
        interval = max(int(r * (1 - overlap)), 1)
        total *= 1 if s <= r else math.ceil((s - r) / interval) + 1
    return total


class _Enough(Exception):
    pass


@dataclass(frozen=True)
class SlidingWindow:
    roi_size: tuple[int, ...]
    overlap: float
    sw_batch_size: int = 1
    precision: str = "auto"  # U-Net autocast (``device.autocast_context``)

    def windows(self, shape: Sequence[int]) -> int:
        return count_windows(shape, self.roi_size, self.overlap)

    def calls(self, shape: Sequence[int]) -> int:
        """Predictor calls (batches of ``sw_batch_size`` windows) for an image of ``shape``."""
        return math.ceil(self.windows(shape) / self.sw_batch_size)

    def probability(self, x: torch.Tensor, encode: Callable[[int, torch.Tensor], Features],
                    decode: Callable[[Features, torch.Tensor | None], torch.Tensor], g: torch.Tensor | None = None,
                    *, note_per_window: Callable[[], torch.Tensor] | None = None,
                    progress: Callable[[int, int], None] | None = None, cancel: Callable[[], None] | None = None,
                    max_windows: int = 0) -> tuple[torch.Tensor | None, int]:
        """x: (1, 1, X, Y, Z) -> (foreground probabilities (1, C - 1, X, Y, Z): the softmax of every class but
        the background, one channel per structure; their sum is the whole CTV's; windows run).

        ``encode(call, windows)``: encoder features of predictor call ``call`` (MONAI visits the
        windows in a fixed order, so call i always sees the same windows: a cache may answer it);
        ``decode(features, g)``: logits. ``g`` (B, N, D) is the note embedding, or ``note_per_window``
        computes it again for every window (the reference loop). ``cancel`` raises to stop before a
        window; ``progress(done, total)`` after each batch. ``max_windows``: stop after that many
        (timing a sample of a slow loop) and return no probability.
        """
        from monai.inferers import sliding_window_inference

        total = self.windows(x.shape[2:])
        done = 0
        device = x.device

        def predictor(window: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if max_windows and done >= max_windows:
                raise _Enough
            if cancel is not None:
                cancel()
            note = g if note_per_window is None else note_per_window()
            with autocast_context(device, self.precision):
                logits = decode(encode(done // self.sw_batch_size, window), None if note is None else note.to(device))
            done += window.shape[0]
            if progress is not None:
                progress(done, total)
            return torch.softmax(logits.float(), 1)[:, 1:]

        try:
            with torch.inference_mode():
                prob = sliding_window_inference(x, self.roi_size, self.sw_batch_size, predictor, self.overlap,
                                                mode="gaussian", padding_mode="constant", cval=0.0)
        except _Enough:
            return None, done
        return prob, done
