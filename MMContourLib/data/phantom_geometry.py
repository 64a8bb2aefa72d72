"""Geometry for the phantoms: a voxel grid in physical LPS millimetres and the smooth primitives (ellipsoids,
tubes along a polyline, ramps) the anatomy is drawn with."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def _smooth(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ramp(x, lo, hi):
    """0 below lo, 1 above hi, smooth in between (hi < lo gives the falling ramp)."""
    return _smooth((x - lo) / (hi - lo))


def _ellipse_radius(a, b, sin, cos):
    """Distance from the centre to an ellipse (semi-axes a along x, b along y) in direction (sin, cos)."""
    return a * b / np.sqrt((b * sin) ** 2 + (a * cos) ** 2 + 1e-6)


def _draw(rng: np.random.Generator, value) -> float:
    """A number from a knob: fixed, or uniform in (lo, hi). Always one draw, so streams stay aligned."""
    u = rng.random()
    if isinstance(value, (tuple, list)):
        return float(value[0] + (value[1] - value[0]) * u)
    return float(value)


class _Grid:
    """An axis-aligned LPS grid; arrays are indexed (z, y, x) as SimpleITK's GetArrayFromImage gives them."""

    def __init__(self, origin, spacing, size):
        self.origin, self.spacing, self.size = np.asarray(origin, float), np.asarray(spacing, float), tuple(size)
        self.x, self.y, self.z = (np.float32(o + s * np.arange(n)) for o, s, n in zip(origin, spacing, size))
        self.shape = (size[2], size[1], size[0])

    def box(self, lo, hi):
        """Index slices and broadcastable coordinates (Z, Y, X) of the voxels inside [lo, hi] (mm)."""
        sl = tuple(slice(int(np.searchsorted(c, l, "left")), int(np.searchsorted(c, h, "right")))
                   for c, l, h in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])))
        return sl, (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :])

    def image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(tuple(self.origin))
        img.SetSpacing(tuple(self.spacing))
        return img


def _ellipsoid(grid: _Grid, centre, semi):
    """(slices, depth): approximate depth inside an axis-aligned ellipsoid in mm (negative outside)."""
    c, s = np.asarray(centre, float), np.asarray(semi, float)
    sl, (Z, Y, X) = grid.box(c - s - 1, c + s + 1)
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    rho = np.sqrt((dx / s[0]) ** 2 + (dy / s[1]) ** 2 + (dz / s[2]) ** 2)
    return sl, np.sqrt(dx * dx + dy * dy + dz * dz) * (1.0 / np.maximum(rho, 1e-3) - 1.0)


def _tube(grid: _Grid, points, radii, pad: float = 0.0):
    """(slices, depth): depth inside a tube along a polyline whose radius varies linearly per segment."""
    p, r = np.asarray(points, float), np.broadcast_to(np.asarray(radii, float), (len(points),))
    reach = r.max() + pad + 1
    sl, (Z, Y, X) = grid.box(p.min(0) - reach, p.max(0) + reach)
    best = np.full(np.broadcast_shapes(Z.shape, Y.shape, X.shape), -np.inf, np.float32)
    for a, b, ra, rb in zip(p[:-1], p[1:], r[:-1], r[1:]):
        ab = b - a
        t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / max(ab @ ab, 1e-6), 0, 1)
        d = np.sqrt((X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2)
        np.maximum(best, ra + t * (rb - ra) - d, out=best)
    return sl, best
