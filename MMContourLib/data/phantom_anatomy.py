"""The phantom patient: anatomy drawn from analytic primitives in physical LPS millimetres.

``phantom`` decides who the patient is (note, knobs) and how the scanner sees them; this module
draws the body itself: the random patient (``_draw_patient``), the drawing primitives (ellipsoids,
tubes along polylines, ramps), the scene of tissue labels painted in order on an axis-aligned grid,
and the guideline sub-region map (``_regions``) on the same grid. ``cfg`` arguments are a
``phantom.PhantomConfig`` (not imported: that module imports this one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..note.clinical import ClinicalNote
from ..note.targets import REGION_LABELS
from .phantom_geometry import _draw, _ellipse_radius, _ellipsoid, _Grid, _ramp, _tube

#: Tissue classes of ``PhantomCase.tissues`` (what each voxel is made of, before blur and noise).
TISSUE_LABELS: dict[str, int] = {
    "air": 0, "skin": 1, "fat": 2, "muscle": 3, "gland": 4, "lung": 5, "cancellous_bone": 6,
    "cortical_bone": 7, "cartilage": 8, "blood": 9, "organ": 10, "airway": 11, "soft": 12, "node": 13,
    "seroma": 14, "clip": 15, "couch": 16, "liver": 17, "kidney": 18, "gas": 19, "bowel": 20, "fluid": 21,
    "scar": 22,
}
_T = TISSUE_LABELS
#: Mean HU per tissue (non-contrast CT); each patient gets a small jitter around these.
TISSUE_HU: dict[str, float] = {
    "air": -1000, "skin": 30, "fat": -100, "muscle": 50, "gland": 38, "lung": -850, "cancellous_bone": 380,
    "cortical_bone": 1000, "cartilage": 130, "blood": 40, "organ": 58, "airway": -990, "soft": 38, "node": 30,
    "seroma": 14, "clip": 3000, "couch": 250, "liver": 60, "kidney": 32, "gas": -1000, "bowel": 28, "fluid": 12,
    "scar": 60,
}
#: Tissues only a planning field of view shows; their jitter comes from the planning stream, so the
#: thorax-only phantoms draw exactly what they drew before these existed.
_PLANNING_TISSUES = ("liver", "kidney", "gas", "bowel", "fluid")
#: Drawn after the patient (``_draw_signs``), so a seed's anatomy is what it was before these existed.
_LATE_TISSUES = ("scar",)
_HU_JITTER = {"fat": 8, "gland": 8, "muscle": 5, "lung": 25, "cancellous_bone": 40, "cortical_bone": 60,
              "blood": 5, "organ": 5, "skin": 5, "soft": 5, "liver": 5, "kidney": 4, "bowel": 6, "fluid": 4}


SKIN_MM = 2.0        # skin thickness
RIB_CAGE_MM = 10.0   # radial thickness of the rib / intercostal layer
PEC_MINOR_MM = 7.0   # radius of the pectoralis minor (a tube: its lateral and medial borders split axilla I / II / III)
_CAGE_ZC, _CAGE_HZ = -185.0, 230.0  # rib-cage "barrel" profile, mm from the sternal notch
_MOUND = 0.8                         # breast mound profile: projection * (1 - q) ** _MOUND


def _pick(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(np.searchsorted(np.cumsum(p / p.sum()), rng.random(), side="right").clip(0, len(keys) - 1))]



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
    # late surgical signs of a conserved breast (``_draw_signs``)
    skin: bool = False        # skin thickening with subcutaneous oedema
    skin_mm: float = 0.0      # extra skin thickness, mm
    oedema_hu: float = 0.0    # extra HU of the subcutaneous fat
    distortion: bool = False  # architectural distortion: a scar at the lumpectomy site with strands to the skin
    scar_semi: np.ndarray = field(default_factory=lambda: np.zeros(3))
    strands: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # where they reach the skin (footprint du, dv)


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
    planning: np.random.Generator | None = None  # draws the neck and abdomen of a planning field of view
    landmarks: dict = field(default_factory=dict)  # z (mm, LPS) of what a planning field of view shows

    @property
    def a0(self):
        return 128.0 * self.sw

    @property
    def b0(self):
        return 85.0 * self.sap

    def cage(self, zs):
        """Semi-axes (a, b) and centre y of the rib cage's outer surface at height zs."""
        if self.planning is not None:  # the abdomen below the cage keeps the width of the lower ribs
            zs = np.maximum(zs, -300.0)
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


def _draw_side(rng, cfg, sign: int, state: str, size: float) -> _Side:
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


def _draw_patient(rng: np.random.Generator, note: ClinicalNote, cfg, scan_length: float,
                  above_notch: float = 55.0) -> _Patient:
    sw = _draw(rng, cfg.body_scale)
    sap = sw * (0.95 + 0.1 * rng.random())
    fat = _draw(rng, cfg.fat_mm)
    size = _draw(rng, cfg.breast_size) * (0.8 + 0.4 * fat / 30.0)
    density = _draw(rng, cfg.breast_density)
    u = rng.random(6)
    hu = {k: v + _HU_JITTER.get(k, 0) * rng.normal() for k, v in TISSUE_HU.items()
          if k not in _PLANNING_TISSUES + _LATE_TISSUES}
    hu.update({k: float(TISSUE_HU[k]) for k in _PLANNING_TISSUES + _LATE_TISSUES})
    k = rng.normal(size=(10, 3))
    k *= (2 * np.pi / rng.uniform(12.0, 32.0, 10) / np.linalg.norm(k, axis=1))[:, None]
    p = _Patient(sw=sw, sap=sap, fat=fat, pec=8.0 + 8.0 * u[0], back=10.0 + 6.0 * u[1], para=20.0 + 6 * u[2],
                 z_sn=scan_length - above_notch + cfg.z_jitter_mm * (2 * u[3] - 1), density=density,
                 arms_up=u[4] < cfg.arms_up_fraction, hu=hu, lung_gradient=30 + 30 * u[5], waves=k,
                 phases=rng.uniform(0, 2 * np.pi, 10), disc_phase=rng.uniform(0, 24.0), sides={})
    for name, sign in (("left", 1), ("right", -1)):
        f = note.findings(name)
        state = "intact" if f is None else ("conserved" if f.surgery == "bcs" else "removed")
        p.sides[name] = _draw_side(rng, cfg, sign, state, size)
    zs = -120.0
    a, b, yc = p.cage(zs)
    p.y_table = float(yc + b + 5 + p.back + p.para + 0.7 * p.fat + SKIN_MM - 6.0)
    for side in p.sides.values():  # drawn last: the rest of a seed's anatomy does not depend on these knobs
        _draw_signs(rng, cfg, side)
    p.hu["scar"] += 6.0 * rng.normal()
    return p


def _draw_signs(rng: np.random.Generator, cfg, side: _Side) -> None:
    """Skin thickening (2-4 mm, subcutaneous oedema +10..30 HU) and architectural distortion (a scar at
    the lumpectomy site, 3-5 strands towards the skin), each with its own probability, only ever on a
    conserved breast. The same number of draws whatever comes out."""
    u = rng.random(5)
    conserved = side.state == "conserved"
    side.skin = bool(conserved and u[0] < cfg.p_skin_thickening)
    side.distortion = bool(conserved and u[1] < cfg.p_distortion)
    side.skin_mm, side.oedema_hu = 2.0 + 2.0 * float(u[2]), 10.0 + 20.0 * float(u[3])
    side.strands = rng.normal(0.0, 1.0, (5, 2))[: 3 + int(3 * u[4])]
    side.scar_semi = rng.uniform(6.0, 10.0, 3)


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
        self.hu_add: list[tuple[tuple, np.ndarray]] = []  # (slices, HU added to the fat there): oedema

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
        for sl, add in self.hu_add:
            hu[sl] += add * (self.T[sl] == _T["fat"])
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


def _draw_surgical_signs(sc: _Scene) -> None:
    """The late signs of breast-conserving surgery on the treated breast (``_draw_signs``): thicker skin
    over the breast with oedema of the fat beneath it (fading over ~3 cm), and a scar at the lumpectomy
    site with strands reaching towards the skin. Sized to show on a 5 mm grid too."""
    p, T, D = sc.p, sc.T, sc.D
    for name, side in p.sides.items():
        if side.state != "conserved":
            continue
        sl, q, _ = sc.footprint[name]
        if side.skin:
            w = _ramp(q, 1.2, 0.8)  # the whole breast, fading out at its edge
            thick = SKIN_MM + side.skin_mm * w
            body = sc.torso[sl] & (D[sl] > 0)
            T[sl][body & (D[sl] <= thick) & np.isin(T[sl], [_T["fat"], _T["gland"]])] = _T["skin"]
            oedema = side.oedema_hu * w * _ramp(D[sl], thick + 30.0, thick + 5.0) * (body & (sc.r[sl] > sc.R_mus[sl]))
            sc.hu_add.append((sl, oedema.astype(np.float32)))
        if side.distortion:
            soft = lambda s: np.isin(T[s], [_T["fat"], _T["gland"]])
            centre = _site_point(p, side, *side.site)
            ssl, depth = _ellipsoid(sc.grid, centre, np.minimum(side.scar_semi, 0.4 * side.proj + 4))
            T[ssl][(depth > 0) & soft(ssl)] = _T["scar"]
            for du, dv in side.strands:
                end = _site_point(p, side, side.site[0] + 0.3 * math.tanh(du), side.site[1] + 0.3 * math.tanh(dv), 1.0)
                tsl, depth = _tube(sc.grid, [centre, end], [3.5, 2.5])
                T[tsl][(depth > 0) & soft(tsl) & sc.torso[tsl]] = _T["scar"]


def _draw_thorax(sc: _Scene) -> None:
    """Rib/intercostal layer, lungs, mediastinum, heart, abdomen below the diaphragm, airway,
    oesophagus, thyroid and the great vessels (non-contrast: blood ~ 40 HU)."""
    p, T, zn = sc.p, sc.T, sc.p.z_sn
    T[(sc.r < sc.R_rc) & (sc.R_rc > RIB_CAGE_MM + 4)] = _T["muscle"]
    sc.cavity = cavity = sc.r < sc.R_rc - RIB_CAGE_MM
    T[cavity] = _T["lung"]
    T[cavity & (sc.absx < p.sw * (12.0 + 6.0 * (1.0 + np.clip(sc.dy / sc.b.clip(1), -1, 1))))] = _T["fat"]
    dome = _dome(p, sc.X, sc.Y)
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


def _dome(p: _Patient, X, Y):
    """Height (mm from the sternal notch) of the hemidiaphragm domes; the right (liver) one higher."""
    yd = p.cage(-200.0)[2] + 10.0
    return np.where(X < 0, -195.0, -212.0) - ((np.abs(X) - 55.0) ** 2 + (Y - yd) ** 2) / 260.0


def _draw_neck_and_abdomen(sc: _Scene, rng: np.random.Generator) -> None:
    """What a planning CT adds above and below the thorax (non-contrast, supine): the cricoid ring, and
    under the diaphragm the liver (right dome), stomach with fluid and an anterior gas cap (left dome),
    spleen, kidneys in perirenal fat, bowel with gas pockets, the abdominal aorta and the IVC."""
    p, T, zn, grid = sc.p, sc.T, sc.p.z_sn, sc.grid
    for k in _PLANNING_TISSUES:
        p.hu[k] = TISSUE_HU[k] + _HU_JITTER.get(k, 0) * rng.normal()
    u = rng.random(8)
    ys = sc.y_spine
    z_cric = zn + 60.0 + 16.0 * u[0]                               # lower border of the cricoid (~C6)
    y_tr = ys(z_cric) - 31 * p.sap
    sl, depth = _tube(grid, [(0, y_tr, z_cric), (0, y_tr - 3, z_cric + 14)], 14.0)
    T[sl][(depth > 0) & (depth < 4) & (T[sl] != _T["airway"])] = _T["cartilage"]
    top = grid.z[-1] + 20
    sc.vessel([(0, y_tr - 3, zn + 100), (0, y_tr + 6, top)], 8, _T["airway"])                   # pharynx
    y_va = p.venous_angle_y()
    for side in p.sides.values():                                                                # carotid, jugular
        s = side.sign
        sc.vessel([(s * 22, y_va + 12, zn + 110), (s * 24, y_va + 14, top)], 4)
        sc.vessel([(s * 38, y_va + 6, zn + 110), (s * 40, y_va + 8, top)], side.vein_r + 1)
    dome, zs = _dome(p, sc.X, sc.Y), sc.zs
    below = sc.cavity & (zs < dome)                                # what _draw_thorax made "organ"
    T[below] = _T["bowel"]
    T[below & (zs > dome - 6)] = _T["muscle"]                      # the diaphragm itself
    inside = below & (zs < dome - 6)
    # liver: the right upper quadrant, its lower edge rising towards the left lobe
    z_low = zn - 330.0 - 40.0 * u[1] + 0.5 * (sc.X + 110.0 * p.sw)
    T[inside & (sc.X < 55.0 * p.sw) & (sc.Z > z_low)] = _T["liver"]
    zl = zn - 212.0
    spleen = _ellipsoid(grid, [88 * p.sw, 0.35 * p.b0, zl - 55], np.array([24, 42, 50]) * p.sw)
    T[spleen[0]][(spleen[1] > 0) & inside[spleen[0]]] = _T["organ"]
    c = np.array([52 * p.sw, -0.25 * p.b0, zl - 62 - 10 * u[2]])  # stomach under the left dome
    semi = np.array([42, 36, 52]) * p.sw * (0.85 + 0.3 * u[3])
    ssl, depth = _ellipsoid(grid, c, semi)
    ok = inside[ssl] & (zs[ssl[0]] < dome[:, ssl[1], ssl[2]] - 4)
    T[ssl][ok & (depth > 0)] = _T["muscle"]                        # wall
    lumen = ok & (depth > 4)
    T[ssl][lumen] = _T["fluid"]
    T[ssl][lumen & (sc.Y[:, ssl[1]] < c[1] - semi[1] * (1 - 2 * (0.2 + 0.25 * u[4])))] = _T["gas"]
    for s, z in ((-1, zn - 310 - 10 * u[5]), (1, zn - 295 - 10 * u[6])):  # kidneys, the right one lower
        c = (s * 62 * p.sw, ys(z) - 30 * p.sap, z)
        for tissue, grow in ((_T["fat"], 9.0), (_T["kidney"], 0.0)):
            ksl, depth = _ellipsoid(grid, c, np.array([26, 24, 52]) * p.sw + grow)
            T[ksl][(depth > 0) & inside[ksl]] = tissue
    bowel = below & (T == _T["bowel"])
    for _ in range(3 + int(4 * u[7])):                             # gas in the bowel, anterior
        c = [rng.uniform(-70, 70) * p.sw, rng.uniform(-0.9, -0.2) * p.b0, zn - rng.uniform(250, 400)]
        gsl, depth = _ellipsoid(grid, c, rng.uniform(7.0, 18.0, 3))
        T[gsl][(depth > 0) & bowel[gsl]] = _T["gas"]
    z_axis = [zn - 215, zn - 320, grid.z[0] - 20]
    sc.vessel([(16, ys(z) - 22, z) for z in z_axis], 11)                                          # aorta
    sc.vessel([(-24, ys(z) - 18, z) for z in (zn - 215, grid.z[0] - 20)], 12, where=sc.cavity)    # IVC
    p.landmarks = {"sternal_notch": float(zn), "cricoid": float(z_cric)}


def _draw_axillae(sc: _Scene) -> None:
    """Muscles that bridge the axilla, the subclavian/axillary vessels, normal-size nodes on both
    sides (never depending on N stage), and the internal mammary vessels beside the sternum."""
    p, T, zn, y_va = sc.p, sc.T, sc.p.z_sn, sc.p.venous_angle_y()
    outside_cage = sc.r > sc.R_rc + 2
    superficial = outside_cage & (sc.D > SKIN_MM + 3)
    for name, side in p.sides.items():
        s, H = side.sign, p.humeral_head(side.sign)
        xa, xb, x0 = 0.6 * p.cage(-100)[0], 0.8 * p.cage(-50)[0], 0.55 * p.cage(-80)[0]
        pec_minor = [(s * xa, p.anterior_y(xa, -105, 6), zn - 105), (s * xb, p.anterior_y(xb, -55, 8), zn - 55),
                     (s * 112 * p.sw, y_va - 10, zn - 12)]                                     # ribs 3-5 -> coracoid
        sc.vessel(pec_minor, PEC_MINOR_MM, _T["muscle"], where=outside_cage)                     # pectoralis minor
        sc.veins[name]["pec_minor"] = np.array(pec_minor)
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


def _axillary_levels(muscle: np.ndarray, vein: np.ndarray, sign: int):
    """How far lateral of the pectoralis minor's axis a point lies, as ESTRO 2015 splits the axilla.

    Level II is posterior to the muscle, so the borders are the muscle's lateral and medial edges seen
    from the front: in the coronal (x, z) plane the muscle (a tube along ``muscle``) is a band of half
    width ``PEC_MINOR_MM`` about its axis. At the point of the axis that passes over the axillary vein
    (``vein``, medial -> lateral) the band's normal points lateral (and caudal); the returned function
    gives w(x, z) in mm along it: w > half width is level I (lateral of the lateral border), below minus
    the half width level III (medial of the medial border, up to the clavicle), in between level II."""
    def dense(points, n=400):
        pts = np.asarray(points, float)[:, [0, 2]]
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        t = np.linspace(0.0, s[-1], n)
        return np.column_stack([np.interp(t, s, pts[:, k]) for k in (0, 1)])

    m, v = dense(muscle), dense(vein)
    i = int(np.argmin(((m[:, None, :] - v[None, :, :]) ** 2).sum(-1)) // len(v))
    tangent = m[min(i + 1, len(m) - 1)] - m[max(i - 1, 0)]
    normal = np.array([tangent[1], -tangent[0]]) / max(float(np.linalg.norm(tangent)), 1e-6)
    normal *= np.sign(normal[0] * sign) or 1.0
    cx, cz = m[i]
    return lambda x, z: normal[0] * (x - cx) + normal[1] * (z - cz)


def _regions(sc: _Scene, cfg, bone: np.ndarray) -> np.ndarray:
    """Sub-region labels for both sides whatever the note says. Priority: chest wall < nodal < breast.
    The axilla is written as ESTRO 2015 levels I-III (``axilla_l1`` ... ``axilla_l3``), split by the
    borders of pectoralis minor (``_axillary_levels``); the unsplit ``axilla`` label is never written."""
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
        levels = _axillary_levels(sc.veins[name]["pec_minor"], ax[1:], side.sign)
        for region, (sl, depth), keep in parts:
            where = (depth > 0) & soft[sl] & on_side[..., sl[2]] & keep(sl)
            if region == "axilla":  # ESTRO 2015 levels I / II / III by the borders of pectoralis minor
                w = levels(grid.x[sl[2]][None, None, :], grid.z[sl[0]][:, None, None])
                level = np.where(w > PEC_MINOR_MM, 1, np.where(w < -PEC_MINOR_MM, 3, 2))
                regions[sl][where] = np.broadcast_to(
                    np.array([0] + [REGION_LABELS[f"axilla_l{k}_{name}"] for k in (1, 2, 3)], np.uint8)[level],
                    where.shape)[where]
            else:
                regions[sl][where] = REGION_LABELS[f"{region}_{name}"]
    for name, side in p.sides.items():
        if side.state != "removed":
            sl, q, _ = sc.footprint[name]
            regions[sl][(q < 1) & (r[sl] > sc.R_mus[sl]) & sc.torso[sl] & (D[sl] > cfg.breast_skin_crop_mm)] = \
                REGION_LABELS[f"breast_{name}"]
    return regions


def _render(p: _Patient, grid: _Grid, cfg):
    """Tissue labels, noise-free HU (float32) and region labels on an axis-aligned grid."""
    sc = _Scene(p, grid)
    _draw_breasts(sc)
    _draw_thorax(sc)
    _draw_axillae(sc)
    if p.planning is not None:
        _draw_neck_and_abdomen(sc, p.planning)
    _draw_surgical_signs(sc)
    bone = _draw_bones(sc)
    if cfg.couch:  # carbon-fibre table top: two thin shells
        for y0 in (1.0, 26.0):
            sc.T[~sc.body & (sc.Y > p.y_table + y0) & (sc.Y < p.y_table + y0 + 5) & (sc.absx < 230)] = _T["couch"]
    return sc.T, sc.hu(), _regions(sc, cfg, bone)
