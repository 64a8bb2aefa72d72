"""Light overlap metrics: numpy only (no torch, no MONAI), so the demo, the manifest batch and the
headless Slicer script can score a contour without the training stack. ``evaluate.py`` has the full
set (MONAI Dice, IoU, HD95 in mm) with bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np

from .grid import check_same_grid


def _mask(x) -> np.ndarray:
    if hasattr(x, "GetSize"):  # a SimpleITK image (imported only by whoever passes one)
        import SimpleITK as sitk

        x = sitk.GetArrayViewFromImage(x)
    return np.asarray(x) > 0


def _check_same_grid(a, b) -> None:
    if hasattr(a, "GetSize") and hasattr(b, "GetSize"):
        check_same_grid(a, b, "the masks are on different grids")


def dice(a, b) -> float:
    """Dice overlap of two masks (anything > 0 is inside): numpy arrays or SimpleITK images, which must
    then be on the same grid. Two empty masks agree perfectly (1.0)."""
    _check_same_grid(a, b)
    x, y = _mask(a), _mask(b)
    if x.shape != y.shape:
        raise ValueError(f"the masks differ in shape: {x.shape} vs {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total
