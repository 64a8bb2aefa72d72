"""Synthetic breast-radiotherapy planning CTs with guideline CTVs (tests, demo, benchmarks).

One seed gives one patient: a clinical note drawn from the case mix of paper Table 6, an anatomy
that agrees with the note, a CT in HU and the CTV the note asks for under the guideline target rules
(``note.targets``, docs/method.md). The anatomy is made of analytic primitives in physical LPS millimetres
(x towards the patient's left, y posterior, z superior) evaluated at voxel centres, then blurred
(partial volume, scanner PSF) and given CT noise.

What the CT shows follows reality. A mastectomy side has no breast mound. A conserved breast
shows a seroma and/or surgical clips in some cases, only ever on a treated side. Nodal status is
never drawn: normal-size nodes sit in both axillae of every patient. So a vision-only model cannot
know the N stage, and knows the side only when the surgery left a trace.

The sub-region label map (``REGION_LABELS``) holds every region for both sides whatever the note
says, so the truth for any note, counterfactual ones included, is ``ctv_for_note(regions, note)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from ..note.clinical import ClinicalNote, SideFindings, note_from_any
from ..note.targets import REGION_LABELS, ctv_for_note

#: Tissue classes of ``PhantomCase.tissues`` (what each voxel is made of, before blur and noise).
TISSUE_LABELS: dict[str, int] = {
    "air": 0, "skin": 1, "fat": 2, "muscle": 3, "gland": 4, "lung": 5, "cancellous_bone": 6,
    "cortical_bone": 7, "cartilage": 8, "blood": 9, "organ": 10, "airway": 11, "soft": 12, "node": 13,
    "seroma": 14, "clip": 15, "couch": 16,
}
_T = TISSUE_LABELS
#: Mean HU per tissue (non-contrast CT); each patient gets a small jitter around these.
TISSUE_HU: dict[str, float] = {
    "air": -1000, "skin": 30, "fat": -100, "muscle": 50, "gland": 38, "lung": -850, "cancellous_bone": 380,
    "cortical_bone": 1000, "cartilage": 130, "blood": 40, "organ": 58, "airway": -990, "soft": 38, "node": 30,
    "seroma": 14, "clip": 3000, "couch": 250,
}
_HU_JITTER = {"fat": 8, "gland": 8, "muscle": 5, "lung": 25, "cancellous_bone": 40, "cortical_bone": 60,
              "blood": 5, "organ": 5, "skin": 5, "soft": 5}

ORIENTATIONS = ("LPS", "RAS", "oblique")
SKIN_MM = 2.0        # skin thickness
RIB_CAGE_MM = 10.0   # radial thickness of the rib / intercostal layer
_CAGE_ZC, _CAGE_HZ = -185.0, 230.0  # rib-cage "barrel" profile, mm from the sternal notch
_MOUND = 0.8                         # breast mound profile: projection * (1 - q) ** _MOUND

# ------------------------------------------------------------------------------------------------
# configuration and results

@dataclass(frozen=True)
class PhantomConfig:
    """Every knob of the generator. A ``(lo, hi)`` pair is drawn uniformly per case; a number is fixed."""

    # grid: ~182 x 155 x 60 voxels at the defaults
    in_plane_spacing: float = 2.2
    slice_thickness: float = 5.0
    fov_mm: tuple[float, float] = (400.0, 340.0)        # left-right, anterior-posterior
    scan_length_mm: float = 300.0                       # ~ below the breasts to above the clavicles
    orientation_mix: Mapping[str, float] = field(default_factory=lambda: {"LPS": 0.8, "RAS": 0.1, "oblique": 0.1})
    oblique_max_deg: float = 10.0
    # scanner
    noise_hu: float | tuple[float, float] = (10.0, 20.0)  # standard deviation of the CT noise
    hu_offset: float | tuple[float, float] = 0.0
    hu_scale: float | tuple[float, float] = 1.0
    blur_mm: float = 0.6                                # in-plane PSF sigma (the voxel box is added to it)
    outside_fov_value: int | None = None                # e.g. -3024: pixels outside the reconstruction circle
    couch: bool = True
    # patient
    body_scale: float | tuple[float, float] = (0.9, 1.08)
    fat_mm: float | tuple[float, float] = (6.0, 28.0)  # subcutaneous fat thickness
    breast_size: float | tuple[float, float] = (0.5, 1.5)  # 1 ~ a 38 mm projection
    breast_density: float | tuple[float, float] = (0.05, 0.6)  # fibroglandular fraction of the breast mound
    arms_up_fraction: float = 1.0                       # breast board, arms above the head
    z_jitter_mm: float = 10.0                           # patient position along the table
    # case mix (paper Table 6: about half N0, a third mastectomy, a few percent bilateral)
    p_bilateral: float = 0.03
    p_left: float = 0.5
    p_mastectomy: float = 0.33
    p_in_situ: float = 0.08                             # DCIS (Tis, N0)
    n_stage_probs: Mapping[str, float] = field(
        default_factory=lambda: {"N0": 0.47, "N1mi": 0.05, "N1": 0.30, "N2": 0.12, "N3": 0.06})
    p_seroma: float = 0.35                              # per conserved breast
    p_clips: float = 0.35
    # target rules
    nodal_margin_mm: float = 5.0                        # ESTRO: ~5 mm around the veins
    breast_skin_crop_mm: float = 5.0
    chestwall_skin_crop_mm: float = 3.0

    def __post_init__(self):
        bad = set(self.orientation_mix) - set(ORIENTATIONS)
        if bad or not self.orientation_mix or min(self.orientation_mix.values()) < 0:
            raise ValueError(f"orientation_mix: use non-negative weights for {', '.join(ORIENTATIONS)}; got "
                             f"{dict(self.orientation_mix)}")
        bad = set(self.n_stage_probs) - {"N0", "N1mi", "N1", "N2", "N3"}
        if bad or not self.n_stage_probs or min(self.n_stage_probs.values()) < 0:
            raise ValueError(f"n_stage_probs: use non-negative weights for N0, N1mi, N1, N2, N3; got "
                             f"{dict(self.n_stage_probs)}")
        if self.in_plane_spacing <= 0 or self.slice_thickness <= 0 or min(self.fov_mm) <= 0:
            raise ValueError("in_plane_spacing, slice_thickness and fov_mm must be positive")

    @classmethod
    def clinical(cls, **changes) -> "PhantomConfig":
        """Real planning-CT resolution: 0.98 mm, 512 x 512, 2.5 mm slices (~30 M voxels; seconds per case)."""
        return replace(cls(in_plane_spacing=500.0 / 512, fov_mm=(500.0, 500.0), slice_thickness=2.5), **changes)

    @classmethod
    def external_site(cls, base: "PhantomConfig | None" = None) -> "PhantomConfig":
        """Another hospital: other scanner calibration, noise, grid and storage, and another case mix."""
        base = base or cls()
        return replace(
            base, in_plane_spacing=base.in_plane_spacing * 1.1, slice_thickness=base.slice_thickness * 0.8,
            orientation_mix={"LPS": 0.4, "RAS": 0.35, "oblique": 0.25}, noise_hu=(20.0, 35.0),
            hu_offset=(12.0, 30.0), hu_scale=(1.02, 1.06), blur_mm=0.9, outside_fov_value=-3024,
            body_scale=(0.92, 1.1), fat_mm=(10.0, 34.0), breast_size=(0.6, 1.7), arms_up_fraction=0.85,
            p_bilateral=0.05, p_mastectomy=0.45, p_in_situ=0.04,
            n_stage_probs={"N0": 0.36, "N1mi": 0.04, "N1": 0.34, "N2": 0.17, "N3": 0.09},
            p_seroma=0.5, p_clips=0.6)

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


@dataclass
class PhantomCase:
    case_id: str
    ct: sitk.Image          # int16 HU
    ctv: sitk.Image         # uint8 0/1: ctv_for_note(regions, note)
    regions: sitk.Image     # uint8 REGION_LABELS, both sides, whatever the note says
    note: ClinicalNote
    tissues: sitk.Image | None = None                   # uint8 TISSUE_LABELS
    info: dict = field(default_factory=dict)           # seed, acquisition, habitus, what the CT shows


# ------------------------------------------------------------------------------------------------
# clinical notes and target rules

def _pick(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(np.searchsorted(np.cumsum(p / p.sum()), rng.random(), side="right").clip(0, len(keys) - 1))]


_T_INVASIVE = {"T1mi": 0.02, "T1a": 0.04, "T1b": 0.10, "T1c": 0.30, "T2": 0.40, "T3": 0.10, "T4b": 0.04}
_PATHOLOGY = {"IDC": 0.78, "ILC": 0.10, "mixed": 0.04, "mucinous": 0.03, "tubular": 0.02, "other": 0.03}
_CHEMO = {"none": 0.35, "adjuvant": 0.40, "neoadjuvant": 0.25}


def sample_note(seed: "int | np.random.Generator", config: PhantomConfig | None = None) -> ClinicalNote:
    """A clinical note drawn from ``config``'s case mix (the same note ``generate_case(seed)`` uses).

    The same number of random draws is used whatever comes out, and N stage is drawn independently of
    surgery, so what the CT shows (surgery) carries no information about what it cannot show (nodes)."""
    cfg = config or PhantomConfig()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng([int(seed), 0])
    u = rng.random(3)
    sides = ("left", "right") if u[0] < cfg.p_bilateral else (("left",) if u[1] < cfg.p_left else ("right",))
    in_situ = u[2] < cfg.p_in_situ
    age = int(np.clip(round(rng.normal(54.0, 11.0)), 25, 90))
    m_stage = _pick(rng, {"M0": 0.96, "M1": 0.02, "MX": 0.02})
    chemo, pathology = _pick(rng, _CHEMO), _pick(rng, _PATHOLOGY)
    per_side = {s: (rng.random() < cfg.p_mastectomy, _pick(rng, cfg.n_stage_probs), _pick(rng, _T_INVASIVE))
                for s in ("left", "right")}
    if in_situ:
        chemo, pathology = "none", "DCIS"
    findings = []
    for s in sides:
        mast, n_stage, t_stage = per_side[s]
        findings.append(SideFindings(s, "N0" if in_situ else n_stage, "mastectomy" if mast else "bcs",
                                     "Tis" if in_situ else t_stage))
    return ClinicalNote(sides=tuple(findings), age=age, m_stage=m_stage, chemotherapy=chemo, pathology=pathology)


# ------------------------------------------------------------------------------------------------
# geometry helpers

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


# ------------------------------------------------------------------------------------------------
# the patient

@dataclass
class _Side:
    sign: int                 # +1 left (LPS +x), -1 right
    state: str                # "intact", "conserved" (after BCS) or "removed" (after mastectomy)
    size: float
    psi_c: float              # footprint centre: angle from the posterior midline (pi = anterior midline)
    hw_psi: float
    zs_c: float               # footprint centre, mm from the sternal notch
    hw_z: float
    proj: float               # projection of the mound, mm
    seroma: bool
    clips: bool
    site: np.ndarray          # lumpectomy site in footprint coordinates (u, v, depth fraction)
    seroma_semi: np.ndarray
    clip_dirs: np.ndarray
    clip_hu: np.ndarray
    nodes: np.ndarray         # (t along the axillary vein, offset x, y, z)
    vein_r: float


@dataclass
class _Patient:
    sw: float
    sap: float
    fat: float
    pec: float
    back: float
    para: float
    z_sn: float               # sternal notch, mm on the table axis
    density: float
    arms_up: bool
    hu: dict
    lung_gradient: float
    waves: np.ndarray         # gland texture: wave vectors (K, 3) and phases (K,)
    phases: np.ndarray
    disc_phase: float
    sides: dict
    y_table: float = 0.0

    @property
    def a0(self):
        return 128.0 * self.sw

    @property
    def b0(self):
        return 85.0 * self.sap

    def cage(self, zs):
        """Semi-axes (a, b) and centre y of the rib cage's outer surface at height zs."""
        g = np.clip(1.0 - ((zs - _CAGE_ZC) / _CAGE_HZ) ** 2, 0.0, 1.0)
        return self.a0 * np.sqrt(g), self.b0 * g ** 0.35, self.sap * 0.12 * np.clip(zs + 120.0, 0.0, None)

    def muscle(self, cos, absx, zs):
        """Thickness of the muscle layer outside the rib cage (pectoralis major in front, back muscles)."""
        pec = self.pec * _ramp(-cos, 0.1, 0.45) * _ramp(absx, 4.0, 26.0) * _ramp(zs, -205, -165) * _ramp(zs, 12, -20)
        post = np.clip(cos, 0.0, None)
        return 5.0 + pec + self.back * post ** 2 + self.para * post ** 8 + 16.0 * _ramp(zs, -40, 15)

    def fat_layer(self, sin):
        return self.fat * (0.7 + 0.5 * sin * sin)

    def anterior_y(self, x, zs, offset=0.0):
        """y of the rib cage's anterior surface at (x, zs), moved ``offset`` mm outwards."""
        a, b, yc = self.cage(zs)
        return yc - b * math.sqrt(max(0.0, 1.0 - (x / max(a, 1.0)) ** 2)) - offset

    def vein_points(self, s: int):
        """Venous angle -> subclavian -> axillary vein (levels III, II, I) -> lateral thoracic, per side."""
        a0, sw = self.a0, self.sw
        y_va = self.venous_angle_y()
        lateral = (-42.0, 2.0) if self.arms_up else (-64.0, -2.0)
        return np.array([
            (s * 32 * sw, y_va, 0.0), (s * 78 * sw, y_va + 2, -6.0), (s * 102 * sw, y_va + 8, -28.0),
            (s * 0.95 * a0, lateral[1], lateral[0]), (s * 0.9 * a0, 14.0 * self.sap, -95.0)]) + [0, 0, self.z_sn]

    def venous_angle_y(self):
        a, b, yc = self.cage(0.0)
        return float(yc - 0.62 * b)

    def humeral_head(self, s: int):
        return np.array([s * 140.0 * self.sw, 8.0 * self.sap, self.z_sn + (18.0 if self.arms_up else 6.0)])


def _draw_side(rng, cfg: PhantomConfig, sign: int, state: str, size: float) -> _Side:
    u = rng.random(8)
    size = size * (0.95 + 0.1 * u[0])
    n_nodes = 3
    return _Side(
        sign=sign, state=state, size=size, psi_c=math.pi - 0.58 - 0.12 * size, hw_psi=0.45 + 0.12 * size,
        zs_c=-112.0 - 8.0 * size, hw_z=52.0 + 16.0 * size, proj=38.0 * size,
        seroma=state == "conserved" and u[1] < cfg.p_seroma, clips=state == "conserved" and u[2] < cfg.p_clips,
        site=np.array([u[3] - 0.5, 0.6 * (u[4] - 0.4), 0.35 + 0.2 * u[5]]),
        seroma_semi=rng.uniform(10.0, 22.0, 3) * np.array([1.0, 0.75, 1.0]), clip_dirs=rng.normal(size=(5, 3)),
        clip_hu=rng.uniform(0.45, 1.0, 5) * (3 + int(u[6] * 3) > np.arange(5)),
        nodes=np.column_stack([rng.uniform(0.3, 1.0, n_nodes), rng.normal(0, 9.0, (n_nodes, 3))]),
        vein_r=5.5 + 1.5 * u[7])


def _draw_patient(rng: np.random.Generator, note: ClinicalNote, cfg: PhantomConfig, scan_length: float) -> _Patient:
    sw = _draw(rng, cfg.body_scale)
    sap = sw * (0.95 + 0.1 * rng.random())
    fat = _draw(rng, cfg.fat_mm)
    size = _draw(rng, cfg.breast_size) * (0.8 + 0.4 * fat / 30.0)
    density = _draw(rng, cfg.breast_density)
    u = rng.random(6)
    hu = {k: v + _HU_JITTER.get(k, 0) * rng.normal() for k, v in TISSUE_HU.items()}
    k = rng.normal(size=(10, 3))
    k *= (2 * np.pi / rng.uniform(12.0, 32.0, 10) / np.linalg.norm(k, axis=1))[:, None]
    p = _Patient(sw=sw, sap=sap, fat=fat, pec=8.0 + 8.0 * u[0], back=10.0 + 6.0 * u[1], para=20.0 + 6 * u[2],
                 z_sn=scan_length - 55.0 + cfg.z_jitter_mm * (2 * u[3] - 1), density=density,
                 arms_up=u[4] < cfg.arms_up_fraction, hu=hu, lung_gradient=30 + 30 * u[5], waves=k,
                 phases=rng.uniform(0, 2 * np.pi, 10), disc_phase=rng.uniform(0, 24.0), sides={})
    for name, sign in (("left", 1), ("right", -1)):
        f = note.findings(name)
        state = "intact" if f is None else ("conserved" if f.surgery == "bcs" else "removed")
        p.sides[name] = _draw_side(rng, cfg, sign, state, size)
    zs = -120.0
    a, b, yc = p.cage(zs)
    p.y_table = float(yc + b + 5 + p.back + p.para + 0.7 * p.fat + SKIN_MM - 6.0)
    return p


# ------------------------------------------------------------------------------------------------
# drawing the patient on a grid

def _site_point(p: _Patient, side: _Side, u: float, v: float, t: float) -> np.ndarray:
    """Physical point at footprint coordinates (u, v) and depth fraction t of the breast mound."""
    psi, zs = side.psi_c + u * side.hw_psi, side.zs_c + v * side.hw_z
    sin, cos = math.sin(psi), math.cos(psi)
    a, b, yc = p.cage(zs)
    r_rc = float(_ellipse_radius(a, b, sin, cos))
    r_m = r_rc + float(p.muscle(cos, r_rc * sin, zs))
    q = u * u + v * v
    thick = side.proj * max(0.0, 1 - q) ** _MOUND * (1 - 0.2 * v) + float(p.fat_layer(sin))
    r = r_m + t * thick
    return np.array([side.sign * r * sin, yc + r * cos, p.z_sn + zs])


def _rib_z(k: int, cos):
    """Height (mm from the sternal notch) of the centre of rib k at angle cos(psi): lower in front."""
    z_post, z_ant = 32.0 - 23.5 * (k - 1), -8.0 - 30.0 * (k - 1)
    return z_ant + (z_post - z_ant) * (1 + cos) / 2


class _Scene:
    """One patient on one axis-aligned grid: per-voxel geometry shared by the drawing steps, and the
    tissue label array ``T`` (z, y, x) they paint in order, later steps over earlier ones.

    Torso geometry is polar about the rib cage's centre in each slice: ``r`` is the distance from it,
    ``sin``/``cos`` the direction (cos = 1 posterior, -1 anterior). Layers outwards: rib cage
    (``R_rc``), muscle (``R_mus``), subcutaneous fat or breast mound, skin. ``D`` is the depth below
    the skin (mm) of the union of torso, shoulders and arms; ``torso`` marks where the torso is outermost."""

    def __init__(self, p: _Patient, grid: _Grid):
        self.p, self.grid = p, grid
        self.X, self.Y, self.Z = grid.x[None, None, :], grid.y[None, :, None], grid.z[:, None, None]
        self.zs = self.Z - np.float32(p.z_sn)
        self.a, self.b, self.yc = (np.float32(v) for v in p.cage(self.zs))
        self.dy = self.Y - self.yc
        self.r = np.sqrt(self.X * self.X + self.dy * self.dy)
        self.absx = np.abs(self.X)
        rs = np.maximum(self.r, 1e-3)
        self.sin, self.cos = self.absx / rs, self.dy / rs
        self.R_rc = _ellipse_radius(self.a, self.b, self.sin, self.cos)
        core = _ellipse_radius(np.maximum(self.a, 52.0 * p.sw), np.maximum(self.b, 48.0 * p.sap), self.sin, self.cos)
        self.R_mus = core + p.muscle(self.cos, self.absx, self.zs)
        self.fat = p.fat_layer(self.sin).astype(np.float32)
        self.footprint = {n: self._footprint(s) for n, s in p.sides.items()}
        bump = np.zeros(grid.shape, np.float32)
        for name, side in p.sides.items():
            sl, q, v = self.footprint[name]
            if side.state == "removed":  # thin mastectomy skin flap instead of a mound
                w = _ramp(q, 1.3, 0.8)
                self.fat[sl] = self.fat[sl] * (1 - w) + np.minimum(self.fat[sl], 5.0) * w
            else:
                bump[sl] += side.proj * np.clip(1 - q, 0, None) ** _MOUND * (1 - 0.2 * v)
        D_torso = np.minimum(self.R_mus + self.fat + SKIN_MM + bump - self.r, p.y_table - self.Y)
        D_parts = np.full(grid.shape, -1e9, np.float32)
        axillary_fat = []
        for side in p.sides.values():
            s, H = side.sign, p.humeral_head(side.sign)
            arm = [H, H + [s * 10, 12, 260]] if p.arms_up else [H + [s * 6, 0, -8], H + [s * 14, 12, -320]]
            axilla = _ellipsoid(grid, [s * 0.86 * p.a0, 10 * p.sap, p.z_sn - 52], np.array([40, 54, 58]) * p.sw)
            axillary_fat.append(axilla)
            for sl, depth in (_ellipsoid(grid, H + [-s * 8 * p.sw, -2, -14], np.array([46, 54, 62]) * p.sw),
                              axilla, _tube(grid, arm, 40 * p.sw)):
                np.maximum(D_parts[sl], depth, out=D_parts[sl])
        self.D = np.maximum(D_torso, D_parts)
        self.torso = D_torso >= D_parts
        self.body = self.D > 0
        self.T = np.zeros(grid.shape, np.uint8)
        T = self.T
        T[self.body] = _T["fat"]
        T[(self.D > SKIN_MM + self.fat) & (~self.torso | (self.r <= self.R_mus))] = _T["muscle"]
        for sl, depth in axillary_fat:  # between the chest-wall muscles and the arm
            T[sl][(depth > 0) & (self.r[sl] > self.R_rc[sl] + 4) & (self.D[sl] > SKIN_MM)] = _T["fat"]
        T[self.body & (self.D <= SKIN_MM)] = _T["skin"]
        self.veins: dict[str, dict] = {}

    def _footprint(self, side: _Side):
        """(slices, q, v) of a breast's footprint on the chest wall: q < 1 inside (a nominal breast's,
        also where it was removed: the chest-wall region follows it), v the cranio-caudal coordinate."""
        g = self.grid
        z0, z1 = side.zs_c - 1.1 * side.hw_z + self.p.z_sn, side.zs_c + 1.1 * side.hw_z + self.p.z_sn
        mid = int(np.searchsorted(g.x, 0.0))
        sl = (slice(int(np.searchsorted(g.z, z0)), int(np.searchsorted(g.z, z1))), slice(None),
              slice(mid, None) if side.sign > 0 else slice(0, mid))
        u = (np.arccos(np.clip(self.cos[sl], -1, 1)) - side.psi_c) / side.hw_psi
        v = np.broadcast_to((self.zs[sl[0]] - side.zs_c) / side.hw_z, u.shape)
        return sl, u * u + v * v, v

    def paint(self, sl, depth, tissue, where=None, halo=0.0):
        """Paint ``tissue`` where depth > 0 (optionally only ``where``), with a fat halo ``halo`` mm wide."""
        ok = np.ones(depth.shape, bool) if where is None else where[sl]
        if halo:
            self.T[sl][ok & (depth > -halo) & (self.T[sl] != _T["skin"])] = _T["fat"]
        self.T[sl][ok & (depth > 0)] = tissue

    def vessel(self, points, radius, tissue=_T["blood"], where=None, halo=0.0):
        self.paint(*_tube(self.grid, points, radius, pad=halo), tissue, where, halo)

    def y_spine(self, z: float) -> float:
        """y of the vertebral bodies' centre at table position z."""
        a, b, yc = self.p.cage(z - self.p.z_sn)
        return float(yc + b - 20 * self.p.sap)

    def hu(self) -> np.ndarray:
        """Noise-free HU: the patient's value per tissue; dependent (posterior) lung is denser."""
        lut = np.array([self.p.hu[k] for k in sorted(TISSUE_LABELS, key=TISSUE_LABELS.get)], np.float32)
        hu = lut[self.T]
        lung = self.T == _T["lung"]
        hu[lung] += self.p.lung_gradient * np.clip(np.broadcast_to(self.dy, lung.shape)[lung] / 80.0, -1, 1)
        return hu


def _draw_breasts(sc: _Scene) -> None:
    """Fibroglandular tissue (a band-limited random texture, denser centrally) and seromas."""
    p, T = sc.p, sc.T
    for name, side in p.sides.items():
        if side.state == "removed":
            continue
        sl, q, _ = sc.footprint[name]
        allowed = (q < 0.8) & (sc.r[sl] > sc.R_mus[sl] + 3) & (sc.D[sl] > SKIN_MM + 4) & sc.torso[sl]
        if allowed.any():
            xyz = [np.broadcast_to(c, allowed.shape)[allowed] for c in (sc.X[..., sl[2]], sc.Y[:, sl[1]], sc.Z[sl[0]])]
            pts = np.stack(xyz, 1) - _site_point(p, side, 0.0, 0.0, 0.0)
            score = np.cos(pts @ p.waves.T + p.phases).sum(1) * math.sqrt(2 / len(p.phases)) + 1.5 * (1 - q[allowed])
            gland = score > np.quantile(score, 1 - p.density)
            T[sl][tuple(i[gland] for i in np.nonzero(allowed))] = _T["gland"]
        if side.seroma:
            ssl, depth = _ellipsoid(sc.grid, _site_point(p, side, *side.site),
                                    np.minimum(side.seroma_semi, 0.5 * side.proj + 6))
            T[ssl][(depth > 0) & np.isin(T[ssl], [_T["fat"], _T["gland"]])] = _T["seroma"]


def _draw_thorax(sc: _Scene) -> None:
    """Rib/intercostal layer, lungs, mediastinum, heart, abdomen below the diaphragm, airway,
    oesophagus, thyroid and the great vessels (non-contrast: blood ~ 40 HU)."""
    p, T, zn = sc.p, sc.T, sc.p.z_sn
    T[(sc.r < sc.R_rc) & (sc.R_rc > RIB_CAGE_MM + 4)] = _T["muscle"]
    sc.cavity = cavity = sc.r < sc.R_rc - RIB_CAGE_MM
    T[cavity] = _T["lung"]
    T[cavity & (sc.absx < p.sw * (12.0 + 6.0 * (1.0 + np.clip(sc.dy / sc.b.clip(1), -1, 1))))] = _T["fat"]
    yd = p.cage(-200.0)[2] + 10.0  # hemidiaphragm domes; the right (liver) one higher
    dome = np.where(sc.X < 0, -195.0, -212.0) - ((sc.absx - 55.0) ** 2 + (sc.Y - yd) ** 2) / 260.0
    T[cavity & (sc.zs < dome)] = _T["organ"]
    sl, depth = _ellipsoid(sc.grid, [18 * p.sw, -0.25 * p.b0, zn - 160], np.array([60, 50, 55]) * p.sw)
    T[sl][cavity[sl] & (depth > -4)] = _T["fat"]                                                  # pericardial fat
    T[sl][cavity[sl] & (depth > 0)] = _T["blood"]                                                 # heart
    ys = sc.y_spine
    z_axis = np.linspace(sc.grid.z[0] - 20, sc.grid.z[-1] + 20, 8)
    sc.vessel(np.column_stack([0 * z_axis + 4, [ys(z) - 14 * p.sap - 4 for z in z_axis], z_axis]), 7, _T["soft"])
    trachea = [(0, ys(z) - 31 * p.sap, z) for z in (zn + 110, zn, zn - 60)]
    sc.vessel(trachea, 9, _T["airway"])
    for s in (1, -1):
        sc.vessel([trachea[-1], (s * 38, ys(zn - 60) - 26, zn - 95)], 6, _T["airway"])            # main bronchi
        sc.vessel([(s * 16, ys(zn + 30) - 36, zn + 22), (s * 16, ys(zn + 30) - 36, zn + 52)], 9, _T["organ"])  # thyroid
    ya, y_svc, y_va = p.anterior_y(0, -100) + 45, p.anterior_y(0, -60) + 38, p.venous_angle_y()
    sc.vessel([(-10, ya, zn - 150), (-10, ya, zn - 55), (2, ya + 25, zn - 36), (18, ys(zn - 50) - 22, zn - 50)]
              + [(16, ys(z) - 22, z) for z in (zn - 120, zn - 200, zn - 320)], [14, 14, 12, 11, 11, 11, 11])  # aorta
    sc.vessel([(-32, y_va, zn), (-27, y_svc, zn - 15), (-25, y_svc, zn - 130)], [8, 10, 10])    # R brachioceph., SVC
    sc.vessel([(32, y_va, zn), (-22, y_svc, zn - 18)], 8)                                         # L brachiocephalic
    for name, side in p.sides.items():
        s = side.sign
        sc.vessel([(s * 20, y_va + 10, zn - 40), (s * 22, y_va + 12, zn + 120)], 4)               # carotid
        ij = [(s * 32, y_va, zn), (s * 36, y_va + 4, zn + 45), (s * 38, y_va + 6, zn + 120)]
        sc.vessel(ij, side.vein_r + 1)                                                            # internal jugular
        sc.veins[name] = {"ij": ij, "ax": p.vein_points(s)}


def _draw_axillae(sc: _Scene) -> None:
    """Muscles that bridge the axilla, the subclavian/axillary vessels, normal-size nodes on both
    sides (never depending on N stage), and the internal mammary vessels beside the sternum."""
    p, T, zn, y_va = sc.p, sc.T, sc.p.z_sn, sc.p.venous_angle_y()
    outside_cage = sc.r > sc.R_rc + 2
    superficial = outside_cage & (sc.D > SKIN_MM + 3)
    for name, side in p.sides.items():
        s, H = side.sign, p.humeral_head(side.sign)
        xa, xb, x0 = 0.6 * p.cage(-100)[0], 0.8 * p.cage(-50)[0], 0.55 * p.cage(-80)[0]
        sc.vessel([(s * xa, p.anterior_y(xa, -105, 6), zn - 105), (s * xb, p.anterior_y(xb, -55, 8), zn - 55),
                   (s * 112 * p.sw, y_va - 10, zn - 12)], 7, _T["muscle"], where=outside_cage)   # pectoralis minor
        sc.vessel([(s * x0, p.anterior_y(x0, -80, 12), zn - 80), (s * 122 * p.sw, y_va - 16, zn - 30),
                   H + [-s * 6, -14, -16]], 9, _T["muscle"], where=superficial)                   # pec. major fold
        sc.vessel([(s * (p.cage(-130)[0] + 6), 35 * p.sap, zn - 130), (s * 132 * p.sw, 32 * p.sap, zn - 40)], 11,
                  _T["muscle"], where=superficial)                                                # latissimus dorsi
        ax = sc.veins[name]["ax"]
        sc.vessel(ax, [side.vein_r, side.vein_r, side.vein_r + 0.5, side.vein_r - 1, 3.0], where=outside_cage)
        sc.vessel(ax[:4] + [0, 7, 5], [4, 4, 4, 3.5], where=outside_cage)                         # artery
        for t, ox, oy, oz in side.nodes:
            seg = t * (len(ax) - 2)
            i = min(int(seg), len(ax) - 3)
            nsl, depth = _ellipsoid(sc.grid, ax[i + 1] + (seg - i) * (ax[i + 2] - ax[i + 1]) + [ox, oy, oz], (5, 4, 6))
            T[nsl][(depth > 0) & (T[nsl] == _T["fat"])] = _T["node"]
        x_im = 24 * p.sw
        im = [(s * x_im, p.anterior_y(x_im, z, -RIB_CAGE_MM - 3), zn + z) for z in (10, -40, -100, -160, -230)]
        sc.vessel(im, 2.5, halo=2.0, where=sc.cavity)                                            # internal mammary
        sc.veins[name]["im"] = im


def _draw_bones(sc: _Scene) -> np.ndarray:
    """Ribs and costal cartilage, sternum, spine, clavicles, scapulae, humeri. Returns the bone mask."""
    p, grid, T = sc.p, sc.grid, sc.T
    band = np.nonzero((sc.r < sc.R_rc - 1) & (sc.r > sc.R_rc - RIB_CAGE_MM) & (sc.R_rc > RIB_CAGE_MM + 4))
    zb = sc.zs[band[0], 0, 0]
    cb, xb = sc.cos[band], sc.absx[0, 0, band[2]]
    radial = (sc.r[band] - (sc.R_rc[band] - 5.5)) / 4.5
    w_st = np.where(zb > -45, 26.0, np.where(zb > -175, 15.0, 8.0)) * p.sw
    for k in range(1, 13):
        zk = _rib_z(k, cb)
        e = radial ** 2 + ((zb - zk) / 6.0) ** 2
        rib = (e < 1) & (cb < 0.955) & (xb > w_st + 2) & ((k < 8) | (cb > -0.6))
        cart = rib & (xb < (40.0 + 6 * k) * p.sw)
        bony = rib & ~cart
        T[tuple(i[cart] for i in band)] = _T["cartilage"]
        T[tuple(i[bony] for i in band)] = np.where(e[bony] > 0.45, _T["cortical_bone"], _T["cancellous_bone"])

    def paint_bone(sl, depth, rim=2.0):
        T[sl][depth > 0] = _T["cortical_bone"]
        T[sl][depth > rim] = _T["cancellous_bone"]

    for z0, z1, w in ((-48, 0, 26), (-175, -48, 15), (-195, -175, 8)):  # manubrium, body, xiphoid
        pts = [(0, p.anterior_y(0, z, -6.5), p.z_sn + z) for z in (z0, (z0 + z1) / 2, z1)]
        sl, (Zb, Yb, Xb) = grid.box(np.array([-w, -200, p.z_sn + z0]), np.array([w, 200, p.z_sn + z1]))
        e = (Xb / (w * p.sw)) ** 2 + ((Yb - np.interp(Zb, [q[2] for q in pts], [q[1] for q in pts])) / 6.5) ** 2
        T[sl][e < 1] = _T["cortical_bone"]
        T[sl][e < 0.55] = _T["cancellous_bone"]
    # spine: vertebral bodies with discs, canal, arch, spinous and transverse processes
    sl, (Zb, Yb, Xb) = grid.box(np.array([-60, -300, -1e4]), np.array([60, 300, 1e4]))
    yv = np.array([sc.y_spine(z) for z in Zb[:, 0, 0]], np.float32)[:, None, None]
    sa, sp = 17 * p.sw, 14 * p.sap
    e = (Xb / sa) ** 2 + ((Yb - yv) / sp) ** 2
    disc = ((Zb - p.z_sn - p.disc_phase) % 24.0) < 5.0
    sub = T[sl]
    sub[(e < 1) & disc] = _T["soft"]
    sub[(e < 1) & ~disc] = _T["cortical_bone"]
    sub[(e < 0.7) & ~disc] = _T["cancellous_bone"]
    yc_canal = yv + sp + 9
    canal = Xb ** 2 + (Yb - yc_canal) ** 2
    sub[(canal < 13.0 ** 2) & (Yb > yv + sp - 2)] = _T["cortical_bone"]
    sub[((Xb / 5) ** 2 + ((Yb - yc_canal - 16) / 12) ** 2) < 1] = _T["cortical_bone"]
    sub[(((np.abs(Xb) - 26) / 12) ** 2 + ((Yb - yv - sp - 6) / 6) ** 2) < 1] = _T["cortical_bone"]
    sub[canal < 8.0 ** 2] = _T["soft"]
    for s in (1, -1):
        c0, zc = p.anterior_y(18, 6, 4), p.z_sn
        clavicle = [(s * 18, c0, zc + 6), (s * 60, c0 + 2, zc + 8), (s * 100, c0 + 22, zc + 14),
                    (s * 128 * p.sw, c0 + 45, zc + 20)]
        paint_bone(*_tube(grid, clavicle, 8.0))
        H = p.humeral_head(s)
        paint_bone(*_ellipsoid(grid, H, (23 * p.sw,) * 3), rim=2.5)
        shaft = [H, H + [s * 10, 12, 260]] if p.arms_up else [H, H + [s * 14, 12, -320]]
        paint_bone(*_tube(grid, shaft, 11.0), rim=3.0)
        paint_bone(*_ellipsoid(grid, H + [-s * 26, 4, 0], (7, 14, 18)), rim=3.0)                 # glenoid
    # scapulae: plates in the back muscles
    off = sc.r - sc.R_rc
    blade = (sc.cos > 0.3) & (sc.sin > 0.4) & (sc.zs > -150) & (sc.zs < 8) & (off > 6) & (off < 10)
    T[blade & (sc.sin < 0.85 + 0.45 * _ramp(sc.zs, -150, -30))] = _T["cortical_bone"]
    return np.isin(T, [_T["cortical_bone"], _T["cancellous_bone"], _T["cartilage"]])


def _regions(sc: _Scene, cfg: PhantomConfig, bone: np.ndarray) -> np.ndarray:
    """Sub-region labels for both sides whatever the note says. Priority: chest wall < nodal < breast."""
    p, grid, T, r, R_rc, D = sc.p, sc.grid, sc.T, sc.r, sc.R_rc, sc.D
    regions = np.zeros(grid.shape, np.uint8)
    for name, side in p.sides.items():
        sl, q, _ = sc.footprint[name]
        cw = (q < 1.21) & (r[sl] > R_rc[sl]) & sc.torso[sl] & ~bone[sl]
        if side.state == "removed":  # all the soft tissue left, up to the skin
            cw &= D[sl] > cfg.chestwall_skin_crop_mm
        else:                        # a thin layer under the breast (the breast label wins where they meet)
            cw &= (r[sl] <= sc.R_mus[sl] + 3) & (D[sl] > cfg.breast_skin_crop_mm)
        regions[sl][cw] = REGION_LABELS[f"chestwall_{name}"]
    soft = ~np.isin(T, [_T["lung"], _T["airway"]]) & ~bone & (D > cfg.breast_skin_crop_mm)
    z_of = lambda sl: grid.z[sl[0]][:, None, None]
    outside_cage = lambda sl: r[sl] > R_rc[sl]
    im_z = (p.z_sn + _rib_z(4, -1.0) + 6.0, p.z_sn + _rib_z(1, -1.0) + 6.0)  # intercostal spaces 1-3 (front)
    margin = cfg.nodal_margin_mm
    for name, side in p.sides.items():
        ax, ij, im, vr = sc.veins[name]["ax"], sc.veins[name]["ij"], sc.veins[name]["im"], side.vein_r
        on_side = (np.sign(grid.x) == side.sign)[None, None, :]
        parts = (  # (region, tube around the vessels, what else a voxel must satisfy)
            ("supraclavicular", _tube(grid, [ax[1], ax[0], ij[0], ij[1]], vr + margin + np.array([0, 0, 6, 6])),
             lambda sl: (z_of(sl) < p.z_sn + 40) & (r[sl] > R_rc[sl] - 2)),
            ("axilla", _tube(grid, ax[1:], [vr + margin] * 3 + [3 + margin]), outside_cage),
            ("axilla", _tube(grid, ax[2:], [vr + margin + 6, vr + margin + 10, 3 + margin + 12]),  # level I fat
             lambda sl: outside_cage(sl) & np.isin(T[sl], [_T["fat"], _T["node"], _T["blood"]])),
            ("internal_mammary", _tube(grid, im, 2.5 + margin),
             lambda sl: (z_of(sl) >= im_z[0]) & (z_of(sl) <= im_z[1])),
        )
        for region, (sl, depth), keep in parts:
            regions[sl][(depth > 0) & soft[sl] & on_side[..., sl[2]] & keep(sl)] = REGION_LABELS[f"{region}_{name}"]
    for name, side in p.sides.items():
        if side.state != "removed":
            sl, q, _ = sc.footprint[name]
            regions[sl][(q < 1) & (r[sl] > sc.R_mus[sl]) & sc.torso[sl] & (D[sl] > cfg.breast_skin_crop_mm)] = \
                REGION_LABELS[f"breast_{name}"]
    return regions


def _render(p: _Patient, grid: _Grid, cfg: PhantomConfig):
    """Tissue labels, noise-free HU (float32) and region labels on an axis-aligned grid."""
    sc = _Scene(p, grid)
    _draw_breasts(sc)
    _draw_thorax(sc)
    _draw_axillae(sc)
    bone = _draw_bones(sc)
    if cfg.couch:  # carbon-fibre table top: two thin shells
        for y0 in (1.0, 26.0):
            sc.T[~sc.body & (sc.Y > p.y_table + y0) & (sc.Y < p.y_table + y0 + 5) & (sc.absx < 230)] = _T["couch"]
    return sc.T, sc.hu(), _regions(sc, cfg, bone)


# ------------------------------------------------------------------------------------------------
# acquisition: grid, blur, storage orientation, clips, noise, calibration

def _rotation(theta_z: float, phi_x: float) -> np.ndarray:
    cz, sz, cx, sx = math.cos(theta_z), math.sin(theta_z), math.cos(phi_x), math.sin(phi_x)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


def _store(grid: _Grid, arrays: dict, orientation: str, rotation: np.ndarray) -> dict:
    """The same physical volume stored as LPS, RAS-flipped or with oblique direction cosines."""
    images = {k: grid.image(v) for k, v in arrays.items()}
    if orientation == "LPS":
        return images
    if orientation == "RAS":
        out = {}
        for k, v in arrays.items():
            img = sitk.GetImageFromArray(np.ascontiguousarray(v[:, ::-1, ::-1]))
            img.SetSpacing(tuple(grid.spacing))
            img.SetOrigin((float(grid.x[-1]), float(grid.y[-1]), float(grid.z[0])))
            img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
            out[k] = img
        return out
    half = grid.spacing * (np.array(grid.size) - 1) / 2
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    ref.SetSpacing(tuple(grid.spacing))
    ref.SetDirection(tuple(rotation.ravel()))
    ref.SetOrigin(tuple(grid.origin + half - rotation @ half))
    out = {}
    for k, img in images.items():
        linear = img.GetPixelID() == sitk.sitkFloat32
        out[k] = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                               -1000.0 if linear else 0.0, img.GetPixelID())
    return out


def _grid_for(p: _Patient, cfg: PhantomConfig, nx: int, ny: int, nz: int) -> _Grid:
    """Centred on the patient left-right and front-back, as a CT operator centres the table."""
    dx = cfg.in_plane_spacing
    a, b, yc = p.cage(-120.0)
    proj = max(s.proj for s in p.sides.values() if s.state != "removed") if any(
        s.state != "removed" for s in p.sides.values()) else 0.0
    y_front = yc - b - 5 - p.pec - 0.7 * p.fat - SKIN_MM - 0.8 * proj
    y_mid = 0.5 * (y_front + min(p.y_table + 30, y_front + ny * dx - 5))
    return _Grid((-(nx - 1) / 2 * dx, y_mid - (ny - 1) / 2 * dx, cfg.slice_thickness / 2),
                 (dx, dx, cfg.slice_thickness), (nx, ny, nz))


def _ct_noise(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """Gaussian noise with a little in-plane correlation (a reconstruction kernel's texture)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0, 0.6, 0.6), mode="wrap",
                                    truncate=2.5)
    return noise * np.float32(std / max(float(noise.std()), 1e-6))


def generate_case(seed: int, config: PhantomConfig | None = None, note: ClinicalNote | None = None,
                  case_id: str | None = None) -> PhantomCase:
    """One patient from ``seed``. With ``note`` given the anatomy follows that note (side, surgery);
    otherwise the note is ``sample_note(seed, config)``. Same seed and config -> identical case.

    Random streams are separate (note, anatomy, scanner, orientation, noise), so changing e.g. the
    orientation mix or the note's N stage leaves the anatomy of a seed unchanged."""
    from scipy import ndimage

    t0 = time.perf_counter()
    cfg = config or PhantomConfig()
    seed = int(seed)
    note = sample_note(seed, cfg) if note is None else note_from_any(note)
    dx, thk = cfg.in_plane_spacing, cfg.slice_thickness
    nx, ny = (max(8, int(round(f / dx))) for f in cfg.fov_mm)
    nz = max(4, int(round(cfg.scan_length_mm / thk)))
    p = _draw_patient(np.random.default_rng([seed, 1]), note, cfg, nz * thk)
    scan = np.random.default_rng([seed, 2])
    noise_hu, offset, scale = _draw(scan, cfg.noise_hu), _draw(scan, cfg.hu_offset), _draw(scan, cfg.hu_scale)
    orient_rng = np.random.default_rng([seed, 3])
    orientation = _pick(orient_rng, cfg.orientation_mix)
    angles = orient_rng.uniform(0.3, 1.0, 2) * np.where(orient_rng.random(2) < 0.5, -1, 1) * [1.0, 0.5]
    angles_deg = angles * cfg.oblique_max_deg if orientation == "oblique" else np.zeros(2)

    grid = _grid_for(p, cfg, nx, ny, nz)
    tissues, hu, regions = _render(p, grid, cfg)
    sigma_xy = math.sqrt(cfg.blur_mm ** 2 + (0.42 * dx) ** 2) / dx
    hu = ndimage.gaussian_filter(hu, (0.42, sigma_xy, sigma_xy), mode="nearest", truncate=3.0)
    noise_rng = np.random.default_rng([seed, 4])
    if orientation != "oblique":  # noise in the scanner's frame; a flipped storage flips it with the anatomy
        hu += _ct_noise(noise_rng, hu.shape, noise_hu)
    images = _store(grid, {"hu": hu, "tissues": tissues, "regions": regions}, orientation,
                    _rotation(*np.radians(angles_deg)))
    hu_img, tissue_img, region_img = images["hu"], images["tissues"], images["regions"]
    hu = sitk.GetArrayFromImage(hu_img)
    tissues = sitk.GetArrayFromImage(tissue_img)

    # surgical clips: metal, painted after the blur so that a 1-2 mm clip stays bright at any slice thickness
    for side in p.sides.values():
        if not side.clips:
            continue
        for d, weight in zip(side.clip_dirs, side.clip_hu):
            if weight <= 0:
                continue
            u, v, t = side.site + [0.15, 0.15, 0.2] * np.tanh(d)
            point = _site_point(p, side, u, v, float(np.clip(t, 0.15, 0.8)))
            idx = hu_img.TransformPhysicalPointToIndex(tuple(float(c) for c in point))
            if all(0 <= i < n for i, n in zip(idx, hu_img.GetSize())):
                k = (idx[2], idx[1], idx[0])
                hu[k] = max(hu[k], p.hu["clip"] * weight)
                tissues[k] = _T["clip"]

    if orientation == "oblique":  # resampling would smooth the noise: add it on the stored grid
        hu += _ct_noise(noise_rng, hu.shape, noise_hu)
    hu = hu * scale + offset
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    if cfg.outside_fov_value is not None:
        jj, ii = np.ogrid[: ct.shape[1], : ct.shape[2]]
        radius = max(cfg.fov_mm) / 2
        outside = ((ii - (ct.shape[2] - 1) / 2) * dx) ** 2 + ((jj - (ct.shape[1] - 1) / 2) * dx) ** 2 > radius ** 2
        ct[:, outside] = cfg.outside_fov_value
    ct_img = sitk.GetImageFromArray(ct)
    ct_img.CopyInformation(hu_img)
    tissue_out = sitk.GetImageFromArray(tissues)
    tissue_out.CopyInformation(hu_img)

    visible = {n: bool(s.state == "removed" or s.seroma or s.clips) for n, s in p.sides.items()}
    info = {
        "seed": seed, "prompt": note.to_prompt(), "orientation": orientation,
        "oblique_deg": [round(float(a), 2) for a in angles_deg], "size": list(ct_img.GetSize()),
        "spacing": list(ct_img.GetSpacing()), "noise_hu": round(noise_hu, 2), "hu_offset": round(offset, 2),
        "hu_scale": round(scale, 4), "arms": "up" if p.arms_up else "down", "body_scale": round(p.sw, 3),
        "fat_mm": round(p.fat, 1), "breast_density": round(p.density, 3),
        "sides": {n: {"breast": s.state, "size": round(float(s.size), 3), "seroma": bool(s.seroma),
                      "clips": bool(s.clips)} for n, s in p.sides.items()},
        "treatment_visible": visible,
        "generation_s": round(time.perf_counter() - t0, 3),
    }
    return PhantomCase(case_id=case_id or f"phantom-{seed}", ct=ct_img, ctv=ctv_for_note(region_img, note),
                       regions=region_img, note=note, tissues=tissue_out, info=info)


__all__ = ["TISSUE_LABELS", "TISSUE_HU", "PhantomConfig", "PhantomCase", "generate_case", "sample_note"]
