"""Synthetic breast-radiotherapy planning CTs with guideline CTVs (tests, demo, benchmarks).

One seed gives one patient: a clinical note drawn from the case mix of paper Table 6, an anatomy
that agrees with the note, a CT in HU and the CTV the note asks for under the guideline target rules
(``note.targets``, docs/method.md). The anatomy is made of analytic primitives in physical LPS millimetres
(x towards the patient's left, y posterior, z superior) evaluated at voxel centres, then blurred
(partial volume, scanner PSF) and given CT noise.

What the CT shows follows reality. A mastectomy side has no breast mound. A conserved breast
shows the surgery in most cases, only ever on a treated side: a seroma, surgical clips, thicker skin
with oedema beneath it, a scar with strands towards the skin (architectural distortion), each drawn
on its own (``PhantomConfig.visibility``: about 90 % show one at the defaults). Nodal status is
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
from ..note.targets import ctv_for_note
from .phantom_anatomy import SKIN_MM, TISSUE_HU, TISSUE_LABELS, _draw_patient, _Patient, _pick, _render, _site_point
from .phantom_geometry import _draw, _Grid
_T = TISSUE_LABELS

ORIENTATIONS = ("LPS", "RAS", "oblique")

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
    # a planning CT's field of view instead: neck (above the cricoid) to upper abdomen (liver, stomach,
    # kidneys, bowel gas), extents in mm above / below the sternal notch; scan_length_mm is then unused
    planning_fov: bool = False
    neck_mm: float | tuple[float, float] = (100.0, 140.0)
    abdomen_mm: float | tuple[float, float] = (330.0, 400.0)
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
    # what shows the treated side of a conserved breast, each drawn on its own; at the defaults
    # 1 - 0.65 * 0.65 * 0.45 * 0.55 = 90 % of conserved breasts show one sign or more, 84 % one that a
    # 5 mm grid keeps (clips are 1-2 mm: ``visibility``)
    p_seroma: float = 0.35                              # per conserved breast
    p_clips: float = 0.35
    p_skin_thickening: float = 0.55                     # skin 2-4 mm thicker, subcutaneous oedema +10..30 HU
    p_distortion: float = 0.45                          # scar at the lumpectomy site with strands to the skin
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
        if min(np.ravel(self.neck_mm)) < 60 or min(np.ravel(self.abdomen_mm)) < 250:
            raise ValueError(f"neck_mm must reach above the cricoid (>= 60 mm above the sternal notch) and abdomen_mm "
                             f"below the diaphragm (>= 250 mm below it); got {self.neck_mm}, {self.abdomen_mm}")

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
            p_seroma=0.5, p_clips=0.6, p_skin_thickening=0.45, p_distortion=0.35)

    def visibility(self) -> dict[str, float]:
        """Chance that a conserved breast shows the treated side: by any sign (seroma, clips, skin
        thickening, distortion), and by one that survives resampling to a 5 mm grid (all but clips)."""
        none = (1 - self.p_seroma) * (1 - self.p_skin_thickening) * (1 - self.p_distortion)
        return {"any_sign": 1 - none * (1 - self.p_clips), "at_5mm": 1 - none}

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
    planning = np.random.default_rng([seed, 5]) if cfg.planning_fov else None
    if planning is None:
        nz, above = max(4, int(round(cfg.scan_length_mm / thk))), 55.0
    else:
        above = _draw(planning, cfg.neck_mm)
        nz = max(4, int(round((above + _draw(planning, cfg.abdomen_mm)) / thk)))
    p = _draw_patient(np.random.default_rng([seed, 1]), note, cfg, nz * thk, above)
    p.planning = planning
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

    coarse = {n: bool(s.state == "removed" or s.seroma or s.skin or s.distortion) for n, s in p.sides.items()}
    visible = {n: bool(coarse[n] or s.clips) for n, s in p.sides.items()}
    info = {
        "seed": seed, "prompt": note.to_prompt(), "orientation": orientation,
        "oblique_deg": [round(float(a), 2) for a in angles_deg], "size": list(ct_img.GetSize()),
        "spacing": list(ct_img.GetSpacing()), "noise_hu": round(noise_hu, 2), "hu_offset": round(offset, 2),
        "hu_scale": round(scale, 4), "arms": "up" if p.arms_up else "down", "body_scale": round(p.sw, 3),
        "fat_mm": round(p.fat, 1), "breast_density": round(p.density, 3),
        "sides": {n: {"breast": s.state, "size": round(float(s.size), 3), "seroma": bool(s.seroma),
                      "clips": bool(s.clips), "skin_thickening": s.skin, "distortion": s.distortion,
                      **({"skin_extra_mm": round(s.skin_mm, 2), "oedema_hu": round(s.oedema_hu, 1)} if s.skin else {})}
                  for n, s in p.sides.items()},
        "treatment_visible": visible,          # mastectomy, or any sign of breast-conserving surgery
        "treatment_visible_5mm": coarse,       # ... that a 5 mm grid keeps (not clips alone)
        **({"field_of_view": "planning", "landmarks_z_mm": p.landmarks} if cfg.planning_fov else {}),
        "generation_s": round(time.perf_counter() - t0, 3),
    }
    return PhantomCase(case_id=case_id or f"phantom-{seed}", ct=ct_img, ctv=ctv_for_note(region_img, note),
                       regions=region_img, note=note, tissues=tissue_out, info=info)


__all__ = ["TISSUE_LABELS", "TISSUE_HU", "PhantomConfig", "PhantomCase", "generate_case", "sample_note"]
