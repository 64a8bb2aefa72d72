"""Voxel grids: when two images share one, and moving a mask onto another.

A grid is a size, spacing, origin and direction (a SimpleITK image, or ``Grid`` for geometry
without voxels, e.g. a DICOM series' header). Two grids are the same when they have the same
size and every voxel centre of one lies within ``TOLERANCE`` voxels (of the smallest spacing) of
the matching centre of the other. One rule for spacing, origin and direction: what matters is
where the voxels are, and file formats round each of them differently (float32 NIfTI headers,
DICOM decimal strings, RAS <-> LPS matrices).
"""
from __future__ import annotations

from itertools import product
from typing import NamedTuple

import numpy as np

#: Largest allowed voxel-centre displacement, as a fraction of the smallest voxel spacing.
TOLERANCE = 0.01


class Grid(NamedTuple):
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def grid_of(image) -> Grid:
    """The grid of a SimpleITK image (or a ``Grid``, returned as is)."""
    if isinstance(image, Grid):
        return image
    return Grid(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                tuple(image.GetDirection()))


def _index_to_point(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    n = len(grid.size)
    matrix = np.asarray(grid.direction, float).reshape(n, n) * np.asarray(grid.spacing, float)
    return matrix, np.asarray(grid.origin, float)


def grid_differences(a, b) -> list[str]:
    """What differs between the grids of ``a`` and ``b`` beyond the tolerance (empty: the same grid)."""
    a, b = grid_of(a), grid_of(b)
    if a.size != b.size:
        return [f"size {a.size} vs {b.size}"]
    limit = TOLERANCE * min(min(a.spacing), min(b.spacing))
    (ma, oa), (mb, ob) = _index_to_point(a), _index_to_point(b)
    corners = np.array(list(product(*[(0, max(s - 1, 0)) for s in a.size])), float)  # extremes of a linear map
    shift = lambda m: float(np.abs(corners @ m.T).max())
    parts = {"spacing": shift((np.asarray(a.direction).reshape(ma.shape) * (np.asarray(a.spacing) - b.spacing))),
             "origin": float(np.abs(oa - ob).max()),
             "direction": shift((np.asarray(a.direction) - b.direction).reshape(ma.shape) * np.asarray(b.spacing))}
    if float(np.abs(corners @ (ma - mb).T + (oa - ob)).max()) <= limit:
        return []
    named = [name for name, value in parts.items() if value > limit] or [n for n, v in parts.items() if v > 0]
    text = {"spacing": lambda: f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}",
            "origin": lambda: f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}",
            "direction": lambda: f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}"}
    return [text[name]() for name in named]


def same_grid(a, b) -> bool:
    return not grid_differences(a, b)


def check_same_grid(a, b, what: str, error: type[Exception] = ValueError,
                    advice: str = "resample one onto the other first") -> None:
    """Raise ``error("<what> (<each difference>); <advice>")`` when ``a`` and ``b`` are not on one grid;
    ``what`` says it in the caller's words, e.g. "the mask is not on the grid of CT series 1.2.3"."""
    differences = grid_differences(a, b)
    if differences:
        raise error(f"{what} ({'; '.join(differences)}); {advice}")


def on_grid(mask, reference):
    """``mask`` on ``reference``'s grid (nearest neighbour); unchanged if already there."""
    import SimpleITK as sitk

    if same_grid(mask, reference):
        return mask
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


__all__ = ["TOLERANCE", "Grid", "grid_of", "grid_differences", "same_grid", "check_same_grid", "on_grid"]
