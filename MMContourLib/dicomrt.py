"""DICOM RT in and out: CT series + RTSTRUCT from a hospital's planning export, RTSTRUCT / DICOM SEG back.

Library choice: pydicom reads every header and builds the RTSTRUCT (no maintained library writes an
RTSTRUCT from a mask on an arbitrary, possibly oblique, grid without pulling OpenCV in: rt-utils needs
opencv-python and assumes its own slice handling); highdicom builds the DICOM SEG, copying patient and
study from the CT; contourpy (matplotlib's marching squares) turns mask slices into closed polygons and
matplotlib's ``Path`` fills polygons back into masks; SimpleITK (GDCM) decodes the CT pixels, so JPEG
lossless / JPEG 2000 exports read as well as uncompressed ones.

Geometry is validated by us, not left to a reader's guess: a series must be one CT series with one
orientation, slices stacked perpendicular to their plane (a gantry tilt that shears the volume is
refused), no duplicate positions and uniform spacing (a missing slice is refused with its position).
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .fileio import atomic_write as _atomic_write, write_text as _write_text
from .imageio import write_image
from .note import ClinicalNote

if TYPE_CHECKING:  # pydicom is imported where it is used, so `mmcontour --help` does not load it
    from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
#: The RT Referenced Study's SOP class that RT objects conventionally name (Detached Study Management).
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

#: Structure names (fnmatch, case-insensitive) that make up the target; every match is united.
DEFAULT_CTV_PATTERNS = ("CTV", "CTV_*", "CTV[0-9]*", "CTVp", "CTVp_*", "CTVn", "CTVn_*", "CTV-*")
#: Matches of the above that are not the breast/chest-wall + nodal CTV (boost, evaluation, old copies).
DEFAULT_EXCLUDE_PATTERNS = ("z*", "_*", "*boost*", "*_tb", "*_tb_*", "*tumo*bed*", "*eval*", "*old*",
                            "*opt*", "*ptv*", "*ring*", "*^*")
#: TG-263-style ROI name for exports; ``{lat}`` becomes ``_L``, ``_R`` or nothing for both sides.
DEFAULT_ROI_TEMPLATE = "CTV{lat}"
DEFAULT_COLOR = (255, 0, 0)
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
MANIFEST_COLUMNS = ("case_id", "ct", "ctv", "split", "age", "side", "t_stage", "n_stage", "m_stage", "surgery",
                    "chemotherapy", "pathology")


# -- errors: each carries the skip reason that import-dicom reports ----------------------------------
class DicomError(ValueError):
    """A DICOM input MMContour cannot use; the message says what is wrong and what to do."""

    reason = "unreadable"


class DicomGeometryError(DicomError):
    reason = "broken-geometry"


class NotCTError(DicomError):
    reason = "non-ct-modality"


class SeveralSeriesError(DicomError):
    reason = "several-ct-series"


class WrongSeriesError(DicomError):
    reason = "wrong-series"


class NoMatchingStructureError(DicomError):
    reason = "no-matching-structure"


class EmptyContourError(DicomError):
    reason = "empty-contour"


# -- small helpers ---------------------------------------------------------------------------------


def _list_files(folder_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(folder_or_files, (str, os.PathLike)):
        root = Path(folder_or_files)
        if not root.exists():
            raise DicomError(f"not found: {root}")
        if root.is_file():
            return [root]
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [Path(p) for p in folder_or_files]


def _read_header(path: Path) -> Dataset | None:
    """The header without pixel data, or None for a file that is not DICOM (or is a DICOMDIR)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return None
    if ds.get("SOPClassUID", "") == DICOMDIR_STORAGE or "DirectoryRecordSequence" in ds:
        return None
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(ds: Dataset, keyword: str) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return np.array([float(v) for v in (value if isinstance(value, Iterable) else [value])], dtype=float)
    except (TypeError, ValueError):
        return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


# -- CT series: sort, validate, read -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CTSeriesInfo:
    """A validated CT series. ``files`` and ``sop_instance_uids`` are in image order (slice index k)."""

    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major, as SimpleITK; columns: row, column and slice directions
    gantry_tilt: float  # degrees recorded in GantryDetectorTilt (0 when absent)
    warnings: tuple[str, ...]
    header: Dataset  # the first slice's header (no pixels): the identity an export copies

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix from continuous index (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = np.array(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m


def _describe(files: Sequence[Path]) -> str:
    return str(files[0].parent) if files else "<no files>"


def scan_ct_series(folder_or_files) -> CTSeriesInfo:
    """Sort and validate a CT series from its headers alone (no pixel data is read)."""
    files = _list_files(folder_or_files)
    images = [(f, ds) for f in files if (ds := _read_header(f)) is not None and "Rows" in ds]
    where = _describe(files)
    if not images:
        raise DicomError(f"no DICOM image in {where}: give the folder of the planning CT series")
    by_series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for f, ds in images:
        by_series[_text(ds, "SeriesInstanceUID")].append((f, ds))
    ct = {uid: items for uid, items in by_series.items() if _text(items[0][1], "Modality").upper() == "CT"}
    if not ct:
        found = sorted({_text(ds, "Modality") or "?" for _, ds in images})
        raise NotCTError(f"{where} holds {'/'.join(found)} images, not CT: MMContour contours planning CTs")
    if len(ct) > 1:
        desc = "; ".join(f"{uid} ({len(items)} images, '{_text(items[0][1], 'SeriesDescription')}')"
                         for uid, items in ct.items())
        raise SeveralSeriesError(f"{where} holds {len(ct)} CT series ({desc}): give the folder or files of one")
    (series_uid, items), = ct.items()
    return _validate_series(series_uid, items, where)


def _validate_series(series_uid: str, items: list[tuple[Path, Dataset]], where: str) -> CTSeriesInfo:
    warnings: list[str] = []
    first = items[0][1]
    for f, ds in items:
        if _text(ds, "SOPClassUID") == ENHANCED_CT_IMAGE_STORAGE or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomError(f"{f} is a multi-frame (Enhanced) CT: export the planning CT as single-frame CT images")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if _floats(ds, keyword) is None:
                raise DicomGeometryError(f"{f} has no {keyword}: the slice cannot be placed in the patient; "
                                         f"re-export the series with its geometry")
    iops = np.array([_floats(ds, "ImageOrientationPatient") for _, ds in items])
    if iops.shape[1] != 6 or np.abs(iops - iops[0]).max() > 1e-4:
        raise DicomGeometryError(f"series {series_uid} in {where}: ImageOrientationPatient changes from slice to "
                                 f"slice; a volume needs one orientation (is it a localizer or a mixed export?)")
    row, col = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomGeometryError(f"series {series_uid}: ImageOrientationPatient {list(iops[0])} is not two "
                                 f"orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    for keyword in ("Rows", "Columns", "PixelSpacing", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword)) for _, ds in items}
        if len(values) > 1:
            raise DicomGeometryError(f"series {series_uid}: {keyword} differs between slices ({sorted(values)})")
    positions = np.array([_floats(ds, "ImagePositionPatient") for _, ds in items])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    items, positions, distance = [items[i] for i in order], positions[order], distance[order]

    keep = [0]
    duplicates = []
    for i in range(1, len(items)):
        if distance[i] - distance[keep[-1]] < 1e-3:
            same = _text(items[i][1], "SOPInstanceUID") == _text(items[keep[-1]][1], "SOPInstanceUID")
            if same and np.allclose(positions[i], positions[keep[-1]], atol=1e-3):
                warnings.append(f"{items[i][0].name} is a second copy of {items[keep[-1]][0].name}; read once")
                continue
            duplicates.append((items[keep[-1]][0].name, items[i][0].name, distance[i]))
        keep.append(i)
    if duplicates:
        shown = "; ".join(f"{a} and {b} at {d:.2f} mm" for a, b, d in duplicates[:3])
        raise DicomGeometryError(f"series {series_uid}: {len(duplicates)} slice position(s) occur twice ({shown}"
                                 f"{' ...' if len(duplicates) > 3 else ''}); the export mixes two acquisitions or "
                                 f"reconstructions: export one")
    items, positions, distance = [items[i] for i in keep], positions[keep], distance[keep]
    if len(items) < 2:
        raise DicomGeometryError(f"series {series_uid} has {len(items)} slice: a planning CT needs a volume")

    tilt = _floats(first, "GantryDetectorTilt")
    tilt_recorded = float(tilt[0]) if tilt is not None else 0.0
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    pixel = _floats(first, "PixelSpacing")
    if in_plane.max() > 0.1 * float(pixel.min()):
        span = distance[-1] - distance[0]
        angle = float(np.degrees(np.arctan2(in_plane[-1], span)))
        recorded = f"; GantryDetectorTilt records {tilt_recorded:g} deg" if tilt_recorded else ""
        raise DicomGeometryError(
            f"series {series_uid}: the slices are not stacked perpendicular to their plane (sheared by {angle:.1f} "
            f"deg, as a gantry tilt does{recorded}). MMContour needs a rectilinear volume: reconstruct the CT without "
            f"tilt, or load it in 3D Slicer with 'Acquisition geometry regularization' on, harden the transform and "
            f"save it as NRRD/NIfTI")
    if tilt_recorded:
        warnings.append(f"GantryDetectorTilt is {tilt_recorded:g} deg, but the slices are stacked perpendicular to "
                        f"their tilted plane: read as an oblique volume")

    gaps = np.diff(distance)
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > max(0.01, 0.01 * step)
    if off.any():
        i = int(np.argmax(off))
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) < 0.05 and round(ratio) >= 2:
            missing = int(sum(round(g / step) - 1 for g in gaps[off] if round(g / step) >= 2))
            raise DicomGeometryError(
                f"series {series_uid}: about {missing} slice(s) missing: the gap between {items[i][0].name} "
                f"({distance[i]:.2f} mm) and {items[i + 1][0].name} ({distance[i + 1]:.2f} mm) is {gaps[i]:.2f} mm, "
                f"the slice spacing is {step:.2f} mm. Re-export the complete series")
        raise DicomGeometryError(f"series {series_uid}: slice spacing is not uniform ({gaps.min():.2f} to "
                                 f"{gaps.max():.2f} mm); resample it to one spacing or export a uniform series")

    direction = np.column_stack([row, col, normal])
    pixel_spacing = _floats(first, "PixelSpacing")  # DICOM order: row spacing (between rows), column spacing
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), float((distance[-1] - distance[0]) / (len(items) - 1)))
    return CTSeriesInfo(
        files=tuple(f for f, _ in items), sop_instance_uids=tuple(_text(ds, "SOPInstanceUID") for _, ds in items),
        sop_class_uid=_text(first, "SOPClassUID") or CT_IMAGE_STORAGE, series_instance_uid=series_uid,
        study_instance_uid=_text(first, "StudyInstanceUID"), frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        patient_id=_text(first, "PatientID"), size=(int(first.Columns), int(first.Rows), len(items)),
        spacing=spacing, origin=tuple(float(v) for v in positions[0]), direction=tuple(direction.ravel()),
        gantry_tilt=tilt_recorded, warnings=tuple(warnings), header=first)


def read_ct_series(folder_or_files) -> tuple[sitk.Image, CTSeriesInfo]:
    """Read one CT series (a folder, searched recursively, or its files) in HU on its validated grid.
    Raises DicomGeometryError (missing/duplicate slice, gantry-tilt shear, ...) or another DicomError."""
    info = scan_ct_series(folder_or_files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in info.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies each slice's own rescale slope/intercept
    try:
        volume = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as exc:
        raise DicomError(f"cannot decode the pixels of series {info.series_instance_uid}: "
                         f"{str(exc).strip().splitlines()[-1]}") from None
    if volume.shape != info.size[::-1]:
        raise DicomGeometryError(f"series {info.series_instance_uid}: pixel data {volume.shape[::-1]} does not match "
                                 f"the headers {info.size}")
    if np.all(volume == np.round(volume)) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(info.spacing)
    image.SetOrigin(info.origin)
    image.SetDirection(info.direction)
    return image, info


def _ct_info(ct_series) -> CTSeriesInfo:
    return ct_series if isinstance(ct_series, CTSeriesInfo) else scan_ct_series(ct_series)


def _check_on_grid(mask: sitk.Image, info: CTSeriesInfo) -> np.ndarray:
    """The mask as a (k, j, i) bool array, after checking it lies on the CT's own grid."""
    problems = []
    if tuple(mask.GetSize()) != info.size:
        problems.append(f"size {mask.GetSize()} vs {info.size}")
    if not np.allclose(mask.GetSpacing(), info.spacing, rtol=1e-3, atol=1e-4):
        problems.append(f"spacing {_fmt(mask.GetSpacing())} vs {_fmt(info.spacing)}")
    if not np.allclose(mask.GetOrigin(), info.origin, atol=max(0.01, 0.05 * min(info.spacing))):
        problems.append(f"origin {_fmt(mask.GetOrigin())} vs {_fmt(info.origin)}")
    if not np.allclose(mask.GetDirection(), info.direction, atol=1e-4):
        problems.append("direction differs")
    if problems:
        raise DicomGeometryError(f"the mask is not on the grid of CT series {info.series_instance_uid} "
                                 f"({'; '.join(problems)}): contour that CT, or resample the mask onto it first")
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        raise EmptyContourError("the mask is empty: there is no CTV to export")
    return array


# -- structure names ---------------------------------------------------------------------------------
def match_structures(names: Iterable[str], patterns: Sequence[str] = DEFAULT_CTV_PATTERNS,
                     exclude: Sequence[str] = DEFAULT_EXCLUDE_PATTERNS) -> list[str]:
    """The names that match a pattern and no exclusion (fnmatch, case-insensitive, whole name)."""
    def hit(name, pats):
        return any(fnmatch.fnmatchcase(name.strip().lower(), p.lower()) for p in pats)
    return [n for n in names if hit(n, patterns) and not hit(n, exclude or ())]


def format_roi_name(template: str = DEFAULT_ROI_TEMPLATE, note: ClinicalNote | None = None) -> str:
    """A TG-263-style ROI name: ``{lat}`` -> ``_L`` / ``_R`` / '' (both sides or no note)."""
    lat = {"left": "_L", "right": "_R"}.get(note.side if note is not None else "", "")
    try:
        name = template.format(lat=lat)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"ROI name template {template!r}: only the placeholder {{lat}} is known ({exc})") from None
    if not re.fullmatch(r"[A-Za-z0-9_^~\-]{1,16}", name):
        raise ValueError(f"ROI name {name!r} is not TG-263 style: 1-16 characters, letters, digits, _ ^ ~ -, "
                         f"no spaces (e.g. 'CTV', 'CTV_L', 'CTVp_Breast_L')")
    return name


# -- RTSTRUCT in --------------------------------------------------------------------------------------
def _roi_names(ds: Dataset) -> dict[int, str]:
    return {int(r.ROINumber): _text(r, "ROIName") for r in ds.get("StructureSetROISequence", [])}


def _referenced_series(ds: Dataset) -> tuple[set[str], set[str], set[str]]:
    """(frames of reference, series UIDs, image SOP instance UIDs) the structure set says it was drawn on."""
    frames, series, sops = set(), set(), set()
    for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(_text(ref_for, "FrameOfReferenceUID"))
        for study in ref_for.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                series.add(_text(ser, "SeriesInstanceUID"))
                sops.update(_text(img, "ReferencedSOPInstanceUID") for img in ser.get("ContourImageSequence", []))
    for roi in ds.get("StructureSetROISequence", []):
        frames.add(_text(roi, "ReferencedFrameOfReferenceUID"))
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            sops.update(_text(img, "ReferencedSOPInstanceUID") for img in contour.get("ContourImageSequence", []))
    return frames - {""}, series - {""}, sops - {""}


def _check_references(ds: Dataset, info: CTSeriesInfo, label: str) -> None:
    frames, series, sops = _referenced_series(ds)
    if series and info.series_instance_uid not in series:
        raise WrongSeriesError(f"{label} was drawn on CT series {', '.join(sorted(series))}, not on this CT "
                               f"({info.series_instance_uid}): export the series the structures reference")
    if frames and info.frame_of_reference_uid not in frames:
        raise WrongSeriesError(f"{label} is in frame of reference {', '.join(sorted(frames))}, the CT in "
                               f"{info.frame_of_reference_uid}: it belongs to another scan")
    unknown = sops - set(info.sop_instance_uids)
    if unknown:
        raise WrongSeriesError(f"{label} references {len(unknown)} image(s) that are not in CT series "
                               f"{info.series_instance_uid} (e.g. {sorted(unknown)[0]}): export the complete series")


def _fill_polygon(points_ij: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres (j, i) inside a closed polygon given in continuous (i, j) index coordinates."""
    from matplotlib.path import Path as PolygonPath

    out = np.zeros(shape, bool)
    lo = np.maximum(np.floor(points_ij.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points_ij.max(axis=0)).astype(int), [shape[1] - 1, shape[0] - 1])
    if (hi < lo).any():
        return out
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    inside = PolygonPath(points_ij).contains_points(np.column_stack([ii.ravel(), jj.ravel()]))
    out[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = inside.reshape(ii.shape)
    return out


def _as_dataset(rtstruct) -> tuple[Dataset, str]:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    if isinstance(rtstruct, Dataset):
        return rtstruct, f"RTSTRUCT {_text(rtstruct, 'SOPInstanceUID')}"
    try:
        return pydicom.dcmread(rtstruct), f"RTSTRUCT {rtstruct}"
    except (InvalidDicomError, OSError) as exc:
        raise DicomError(f"cannot read {rtstruct} as DICOM: {exc}") from None


def rtstruct_to_mask(rtstruct, ct_image: sitk.Image, ct_info: CTSeriesInfo,
                     patterns: Sequence[str] = DEFAULT_CTV_PATTERNS,
                     exclude: Sequence[str] = DEFAULT_EXCLUDE_PATTERNS) -> sitk.Image:
    """The union of the structures whose names match ``patterns`` as a uint8 0/1 mask on the CT grid.

    Contours of one structure on one slice combine by even-odd (an inner contour is a hole); structures
    combine by union. The RTSTRUCT must reference this CT series (WrongSeriesError otherwise)."""
    ds, label = _as_dataset(rtstruct)
    if _text(ds, "Modality").upper() != "RTSTRUCT":
        raise DicomError(f"{label} has modality {_text(ds, 'Modality') or '?'}, not RTSTRUCT")
    _check_references(ds, ct_info, label)
    names = _roi_names(ds)
    chosen = set(match_structures(names.values(), patterns, exclude))
    if not chosen:
        raise NoMatchingStructureError(
            f"{label}: no structure name matches {', '.join(patterns)} (excluding {', '.join(exclude or ())}); "
            f"it has {', '.join(sorted(names.values())) or 'no structures'}. Pass the target's name as a pattern")
    size = ct_image.GetSize()
    to_index = np.linalg.inv(ct_info.index_to_physical())
    mask = np.zeros(size[::-1], bool)
    for roi in ds.get("ROIContourSequence", []):
        name = names.get(int(roi.get("ReferencedROINumber", -1)), "")
        if name not in chosen:
            continue
        roi_mask = np.zeros_like(mask)
        for n, contour in enumerate(roi.get("ContourSequence", [])):
            data = _floats(contour, "ContourData")
            if _text(contour, "ContourGeometricType").upper() != "CLOSED_PLANAR" or data is None or len(data) < 9:
                continue
            points = np.column_stack([data.reshape(-1, 3), np.ones(len(data) // 3)]) @ to_index.T
            k = float(np.round(points[:, 2].mean()))
            if np.abs(points[:, 2] - k).max() > 0.25:
                raise DicomGeometryError(f"{label}: contour {n + 1} of '{name}' does not lie in a slice plane of the "
                                         f"CT (drawn on another image grid?)")
            if not 0 <= k < size[2]:
                raise DicomGeometryError(f"{label}: contour {n + 1} of '{name}' lies outside the CT's slices")
            roi_mask[int(k)] ^= _fill_polygon(points[:, :2], roi_mask.shape[1:])
        mask |= roi_mask
    if not mask.any():
        raise EmptyContourError(f"{label}: the structure(s) {', '.join(sorted(chosen))} have no closed planar "
                                f"contour covering a voxel of the CT")
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(ct_image)
    return out


# -- RTSTRUCT / SEG out ---------------------------------------------------------------------------------
def _slice_polygons(slice_mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (continuous (i, j) index, not repeating the first point) bounding a 2D mask; pixel
    centres inside the polygons (even-odd) are exactly the mask's voxels."""
    from contourpy import LineType, contour_generator

    padded = np.pad(slice_mask.astype(np.float64), 1)  # so every line closes inside the image
    lines = contour_generator(z=padded, line_type=LineType.Separate).lines(0.5)
    polygons = []
    for line in lines:
        pts = np.asarray(line, dtype=float) - 1.0
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
        pts = pts[np.abs(cross) > 1e-9]  # drop vertices in the middle of a straight run: lossless
        if len(pts) >= 3:
            polygons.append(pts)
    return polygons


def _ds(number: float) -> str:
    text = f"{number:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _code_item(code) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _copy_identity(target: Dataset, ct: Dataset) -> None:
    """Patient and study from the CT; type-2 attributes the CT lacks stay empty rather than invented."""
    for keyword in ("SpecificCharacterSet", "IssuerOfPatientID", "PatientAge", "OtherPatientIDsSequence",
                    "StudyDescription", "PatientIdentityRemoved", "DeidentificationMethod"):
        if keyword in ct:
            setattr(target, keyword, ct[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(target, keyword, ct[keyword].value if keyword in ct else "")


def _check_color(color: Sequence[int]) -> list[int]:
    rgb = [int(c) for c in color]
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour {tuple(color)} must be three integers 0-255")
    return rgb


def write_rtstruct(mask: sitk.Image, ct_series_folder, out_path: str | os.PathLike, roi_name: str = "CTV",
                   color: Sequence[int] = DEFAULT_COLOR, algorithm_name: str = "MMContour",
                   algorithm_version: str = "0.1.0", description: str = "") -> Path:
    """Write ``mask`` (on the CT's grid) as an RTSTRUCT referencing the CT series: one CLOSED_PLANAR contour
    per boundary per slice (holes as inner contours), ROI generation AUTOMATIC with the algorithm's name and
    version, approval UNAPPROVED (a clinician reviews it). ``ct_series_folder``: folder, files or CTSeriesInfo."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    info = _ct_info(ct_series_folder)
    array = _check_on_grid(mask, info)
    rgb = _check_color(color)
    if not roi_name or len(roi_name) > 64 or "\\" in roi_name:
        raise ValueError(f"ROI name {roi_name!r} must be 1-64 characters without a backslash")
    ct = info.header
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _copy_identity(ds, ct)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = ""
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = (description or f"{algorithm_name} {algorithm_version} {roi_name}")[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "MMContour"
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = algorithm_version[:64]
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = (algorithm_name or "MMContour")[:16]
    ds.StructureSetName = f"{algorithm_name} {algorithm_version}"[:64]
    if description:
        ds.StructureSetDescription = description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = info.sop_class_uid, info.sop_instance_uids[k]
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = info.series_instance_uid
    series_ref.ContourImageSequence = DicomSequence([image_ref(k) for k in range(info.size[2])])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = STUDY_COMPONENT_SOP_CLASS, \
        info.study_instance_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = info.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    algorithm = Dataset()
    algorithm.AlgorithmFamilyCodeSequence = DicomSequence([_code_item(codes.cid7162.ArtificialIntelligence)])
    algorithm.AlgorithmName, algorithm.AlgorithmVersion = algorithm_name[:64], algorithm_version[:64]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = info.frame_of_reference_uid
    roi.ROIName = roi_name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
    roi.ROIDerivationAlgorithmIdentificationSequence = DicomSequence([algorithm])
    ds.StructureSetROISequence = DicomSequence([roi])

    to_physical = info.index_to_physical()
    contours = []
    for k in np.flatnonzero(array.any(axis=(1, 2))):
        for polygon in _slice_polygons(array[k]):
            points = np.column_stack([polygon, np.full(len(polygon), float(k)), np.ones(len(polygon))]) @ to_physical.T
            item = Dataset()
            item.ContourImageSequence = DicomSequence([image_ref(int(k))])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(contours) + 1
            item.ContourData = [_ds(v) for v in points[:, :3].ravel()]
            contours.append(item)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = rgb
    roi_contour.ReferencedROINumber = 1
    roi_contour.ContourSequence = DicomSequence(contours)
    ds.ROIContourSequence = DicomSequence([roi_contour])

    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType = "CTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    ds.ApprovalStatus = "UNAPPROVED"
    return _atomic_write(Path(out_path), lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def write_dicom_seg(mask: sitk.Image, ct_series_folder, out_path: str | os.PathLike, segment_label: str = "CTV",
                    algorithm_name: str = "MMContour", algorithm_version: str = "0.1.0",
                    color: Sequence[int] = DEFAULT_COLOR, description: str = "") -> Path:
    """Write ``mask`` as a binary DICOM Segmentation (highdicom) referencing the CT series: segment type
    Clinical target volume (SCT 228792002) in category RT Target, algorithm AUTOMATIC with name and version."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    info = _ct_info(ct_series_folder)
    array = _check_on_grid(mask, info).astype(np.uint8)
    rgb = _check_color(color)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment_label[:64], segmented_property_category=codes.cid9580.RTTarget,
        segmented_property_type=codes.SCT.ClinicalTargetVolume,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm_version[:64]),
        display_color=hd.color.CIELabColor.from_rgb(*rgb))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=1,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MMContour",
            manufacturer_model_name=algorithm_name[:64], software_versions=algorithm_version[:64],
            device_serial_number=algorithm_version[:64], content_label="CTV",
            content_description=(description or f"{algorithm_name} {algorithm_version}")[:64])
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(f"highdicom refused to build the DICOM SEG on series {info.series_instance_uid}: "
                         f"{exc}") from None
    return _atomic_write(Path(out_path), lambda tmp: seg.save_as(tmp))


def add_export_arguments(parser) -> None:
    """The DICOM outputs of ``mmcontour predict`` (and the Slicer batch): the CT must be a DICOM series folder."""
    parser.add_argument("--out-rtstruct", type=Path, metavar="FILE",
                        help="also write the CTV as a DICOM RTSTRUCT referencing the input CT series")
    parser.add_argument("--out-dicom-seg", type=Path, metavar="FILE",
                        help="also write the CTV as a DICOM Segmentation referencing the input CT series")
    parser.add_argument("--roi-name", default=DEFAULT_ROI_TEMPLATE, metavar="TEMPLATE",
                        help="TG-263-style ROI name; {lat} becomes _L/_R from the note (default: %(default)s)")
    parser.add_argument("--roi-color", default="255,0,0", metavar="R,G,B", help="ROI colour (default: %(default)s)")


def export_prediction(mask: sitk.Image, ct_series, *, out_rtstruct=None, out_dicom_seg=None,
                      note: ClinicalNote | None = None, roi_template: str = DEFAULT_ROI_TEMPLATE,
                      color: Sequence[int] | str = DEFAULT_COLOR,
                      provenance: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write the requested DICOM outputs for a prediction; the algorithm name/version come from the
    Contourer's provenance (bundle name; bundle version or id), the prompt goes in the description."""
    if isinstance(color, str):
        color = [int(c) for c in color.replace(" ", "").split(",")]
    provenance = dict(provenance or {})
    name = provenance.get("bundle_name") or "MMContour"
    version = (provenance.get("bundle_version") or provenance.get("bundle_id") or provenance.get("mmcontour_version")
               or "unknown")
    prompt = provenance.get("prompt") or (note.to_prompt() if note is not None else "")
    description = f"{name} {version}; note: {prompt}" if prompt else ""
    roi_name = format_roi_name(roi_template, note)
    info = _ct_info(ct_series)
    written = {}
    if out_rtstruct:
        written["rtstruct"] = write_rtstruct(mask, info, out_rtstruct, roi_name=roi_name, color=color,
                                             algorithm_name=name, algorithm_version=version, description=description)
    if out_dicom_seg:
        written["dicom_seg"] = write_dicom_seg(mask, info, out_dicom_seg, segment_label=roi_name,
                                               algorithm_name=name, algorithm_version=version, color=color)
    return written


# -- finding studies in an export ---------------------------------------------------------------------
@dataclass
class SeriesRef:
    series_uid: str
    modality: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    description: str
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: set[str] = field(default_factory=set)


@dataclass
class RTStructRef:
    path: Path
    sop_instance_uid: str
    patient_id: str
    study_uid: str
    frames_of_reference: set[str]
    referenced_series: set[str]
    referenced_sops: set[str]
    roi_names: list[str]
    label: str
    created: str  # StructureSetDate + Time, for choosing the latest
    approved: bool


@dataclass
class Study:
    patient_id: str
    study_uid: str
    series: list[SeriesRef] = field(default_factory=list)
    rtstructs: list[RTStructRef] = field(default_factory=list)

    @property
    def ct_series(self) -> list[SeriesRef]:
        return [s for s in self.series if s.modality.upper() == "CT"]


def find_studies(root: str | os.PathLike, progress: bool = False) -> list[Study]:
    """Every image series (any modality) and RTSTRUCT under ``root``, grouped by study."""
    return _scan_export(root, progress)[0]


def _scan_export(root, progress: bool) -> tuple[list[Study], list[Path]]:
    """(studies, ignored files): files that are not DICOM, or DICOM objects other than images and RTSTRUCTs."""
    studies: dict[str, Study] = {}
    series: dict[str, SeriesRef] = {}
    ignored: list[Path] = []
    for f in _progress(_list_files(root), progress, "scanning DICOM"):
        ds = _read_header(f)
        if ds is None:
            ignored.append(f)
            continue
        key = _text(ds, "StudyInstanceUID")
        study = studies.setdefault(key, Study(_text(ds, "PatientID"), key))
        modality = _text(ds, "Modality").upper()
        if modality == "RTSTRUCT":
            frames, ser, sops = _referenced_series(ds)
            study.rtstructs.append(RTStructRef(
                f, _text(ds, "SOPInstanceUID"), _text(ds, "PatientID"), key, frames, ser, sops,
                list(_roi_names(ds).values()), _text(ds, "StructureSetLabel"),
                _text(ds, "StructureSetDate") + _text(ds, "StructureSetTime"),
                _text(ds, "ApprovalStatus").upper() == "APPROVED"))
        elif "Rows" in ds:
            uid = _text(ds, "SeriesInstanceUID")
            if uid not in series:
                series[uid] = SeriesRef(uid, modality, _text(ds, "PatientID"), key, _text(ds, "FrameOfReferenceUID"),
                                        _text(ds, "SeriesDescription"))
                study.series.append(series[uid])
            series[uid].files.append(f)
            series[uid].sop_instance_uids.add(_text(ds, "SOPInstanceUID"))
        else:
            ignored.append(f)
    return sorted(studies.values(), key=lambda s: (s.patient_id, s.study_uid)), ignored


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file" if "scan" in desc else "case", leave=False)


# -- import-dicom ----------------------------------------------------------------------------------------
@dataclass
class SkippedCase:
    patient_id: str
    reason: str
    message: str
    source: str = ""


@dataclass
class ImportReport:
    out_dir: Path
    manifest: Path
    imported: list[dict] = field(default_factory=list)  # case_id, patient_id, split, structures, series, rtstruct
    skipped: list[SkippedCase] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored_files: int = 0

    def summary(self) -> dict:
        return {"out": str(self.out_dir), "manifest": str(self.manifest), "imported": len(self.imported),
                "skipped": len(self.skipped), "skipped_by_reason": dict(Counter(s.reason for s in self.skipped)),
                "splits": dict(Counter(c["split"] for c in self.imported)), "ignored_files": self.ignored_files,
                "warnings": self.warnings, "skipped_cases": [asdict(s) for s in self.skipped]}


def split_for(patient_id: str) -> str:
    """Deterministic split from a hash of the patient id (80/10/10), stable across runs and machines."""
    u = int.from_bytes(hashlib.sha256(patient_id.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


def read_clinical_table(path: str | os.PathLike) -> dict[str, list[dict[str, str]]]:
    """Rows of a CSV (or .tsv) clinical table by ``patient_id`` (column names are matched case-insensitively)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical table not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if not reader.fieldnames or "patient_id" not in [c.strip().lower() for c in reader.fieldnames]:
        raise ValueError(f"clinical table {path} needs a 'patient_id' column; it has {reader.fieldnames}")
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in reader:
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if clean.get("patient_id"):
            rows[clean["patient_id"]].append(clean)
    return rows


def _case_id(patient_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", patient_id).strip("._") or "case"
    return safe if safe == patient_id else f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:6]}"


def _note_row(rows: list[dict[str, str]] | None, patient_id: str) -> tuple[ClinicalNote, str]:
    """The patient's note and split; raises _Skip when the clinical table cannot give them."""
    if not rows:
        raise _Skip("missing-clinical-row", f"patient {patient_id!r} has no row in the clinical table")
    if len(rows) > 1 and any(r != rows[0] for r in rows[1:]):
        raise _Skip("invalid-clinical-row", f"patient {patient_id!r} has {len(rows)} different rows in the "
                                            f"clinical table: keep one")
    row = rows[0]
    try:
        note = ClinicalNote.from_row(row)
    except ValueError as exc:
        raise _Skip("invalid-clinical-row", f"patient {patient_id!r}: {exc}") from None
    split = row.get("split", "")
    if split:
        if split.lower() not in _SPLIT_ALIASES:
            raise _Skip("invalid-clinical-row", f"patient {patient_id!r}: split {split!r} is not train, val or test")
        return note, _SPLIT_ALIASES[split.lower()]
    return note, split_for(patient_id)


class _Skip(Exception):
    def __init__(self, reason: str, message: str, source: str = ""):
        super().__init__(message)
        self.reason, self.message, self.source = reason, message, source


def _pair(patient_id: str, all_series: list[SeriesRef], rtstructs: list[RTStructRef], patterns, exclude,
          skip: Callable[..., None], warn: Callable[[str], None]) -> tuple[SeriesRef, RTStructRef, list[str]] | None:
    """The one CT series + RTSTRUCT to import for a patient; every other candidate is reported."""
    by_uid = {s.series_uid: s for s in all_series}
    cts = [s for s in all_series if s.modality.upper() == "CT"]
    pairs: dict[str, list[tuple[RTStructRef, list[str]]]] = defaultdict(list)
    for rts in rtstructs:
        src = str(rts.path)
        target = [by_uid[u] for u in rts.referenced_series if u in by_uid]
        if not target and rts.referenced_sops:
            target = [s for s in all_series if s.sop_instance_uids & rts.referenced_sops]
        if not target and not rts.referenced_series and not rts.referenced_sops:
            target = [s for s in cts if s.frame_of_reference_uid in rts.frames_of_reference]
        if not target:
            wanted = ", ".join(sorted(rts.referenced_series)) or "frame of reference " + ", ".join(
                sorted(rts.frames_of_reference))
            if not cts:
                skip("no-ct", f"RTSTRUCT {rts.path.name} was drawn on series {wanted}, and the export holds no CT "
                              f"series for patient {patient_id!r}: export the planning CT with it", src)
            else:
                skip("wrong-series", f"RTSTRUCT {rts.path.name} was drawn on series {wanted}, which is not in the "
                     f"export; the export holds CT series {', '.join(s.series_uid for s in cts)}: export the "
                     f"series the structures reference", src)
            continue
        if len(target) > 1:
            skip("several-ct-series", f"RTSTRUCT {rts.path.name} fits {len(target)} series "
                 f"({', '.join(s.series_uid for s in target)}); cannot tell which it was drawn on", src)
            continue
        series = target[0]
        if series.modality.upper() != "CT":
            skip("non-ct-modality", f"RTSTRUCT {rts.path.name} was drawn on a {series.modality} series "
                 f"({series.series_uid}); MMContour trains on planning CTs", src)
            continue
        names = match_structures(rts.roi_names, patterns, exclude)
        if not names:
            skip("no-matching-structure", f"RTSTRUCT {rts.path.name}: no structure matches "
                 f"{', '.join(patterns)}; it has {', '.join(rts.roi_names) or 'no structures'}", src)
            continue
        pairs[series.series_uid].append((rts, names))
    for s in cts:
        if s.series_uid in pairs or any(s.series_uid in r.referenced_series for r in rtstructs):
            continue
        message = f"CT series {s.series_uid} ('{s.description}', {len(s.files)} images) has no RTSTRUCT in the export"
        if len(pairs) == 1:
            warn(f"{message}; not used")
        elif not rtstructs:  # otherwise the RTSTRUCTs' own reasons say why nothing was paired
            skip("no-rtstruct", message, str(s.files[0].parent))
    if len(pairs) > 1:
        skip("several-ct-series", f"patient {patient_id!r} has a CTV on {len(pairs)} CT series "
             f"({', '.join(pairs)}): cannot tell which is the planning CT; export only that one", "")
        return None
    if not pairs:
        return None
    (series_uid, candidates), = pairs.items()
    candidates.sort(key=lambda c: (c[0].approved, c[0].created, str(c[0].path)), reverse=True)
    chosen = candidates[0]
    for rts, _ in candidates[1:]:
        warn(f"RTSTRUCT {rts.path} not used: {chosen[0].path.name} on the same CT is "
             f"{'approved' if chosen[0].approved else 'newer'}")
    return by_uid[series_uid], chosen[0], chosen[1]


def import_dicom(in_dir: str | os.PathLike, clinical_table: str | os.PathLike, out_dir: str | os.PathLike,
                 patterns: Sequence[str] = DEFAULT_CTV_PATTERNS, exclude: Sequence[str] = DEFAULT_EXCLUDE_PATTERNS,
                 progress: bool = True, overwrite: bool = False) -> ImportReport:
    """Convert a folder of exported planning studies into ``out_dir``: ``cases/<case_id>/ct.nii.gz`` and
    ``ctv.nii.gz`` on the CT grid, ``manifest.csv`` (what ``mmcontour train`` reads), ``skipped.csv`` and
    ``skipped.json`` (every case not imported, with the reason and what to do), ``import_report.json``.
    A bad case never stops the batch. ``overwrite`` is needed when ``out_dir`` already holds a manifest."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.csv"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{manifest_path} exists: choose another --out or pass --overwrite")
    clinical = read_clinical_table(clinical_table)
    report = ImportReport(out_dir, manifest_path)
    studies, ignored = _scan_export(in_dir, progress)
    report.ignored_files = len(ignored)
    by_patient: dict[str, tuple[list[SeriesRef], list[RTStructRef]]] = defaultdict(lambda: ([], []))
    for study in studies:
        for s in study.series:
            by_patient[s.patient_id][0].append(s)
        for r in study.rtstructs:
            by_patient[r.patient_id][1].append(r)

    rows = []
    for patient_id in _progress(sorted(by_patient), progress, "importing"):
        all_series, rtstructs = by_patient[patient_id]
        before = len(report.skipped)

        def skip(reason, message, source="", _pid=patient_id):
            report.skipped.append(SkippedCase(_pid, reason, message, source))

        try:
            if not patient_id:
                raise _Skip("missing-clinical-row", "the DICOM has no PatientID to join the clinical table", "")
            paired = _pair(patient_id, all_series, rtstructs, patterns, exclude, skip,
                           lambda text, _pid=patient_id: report.warnings.append(f"{_pid}: {text}"))
            if paired is None:
                if len(report.skipped) == before:
                    skip("no-ct", f"patient {patient_id!r} has no CT series with an RTSTRUCT in the export")
                continue
            series, rts, names = paired
            note, split = _note_row(clinical.get(patient_id), patient_id)
            try:
                image, info = read_ct_series(series.files)
                mask = rtstruct_to_mask(rts.path, image, info, patterns, exclude)
            except DicomError as exc:
                raise _Skip(exc.reason, str(exc), str(rts.path)) from None
            case_id = _case_id(patient_id)
            case_dir = out_dir / "cases" / case_id
            write_image(image, case_dir / "ct.nii.gz")
            write_image(mask, case_dir / "ctv.nii.gz")
            rows.append({"case_id": case_id, "ct": f"cases/{case_id}/ct.nii.gz", "ctv": f"cases/{case_id}/ctv.nii.gz",
                         "split": split, **note.to_fields()})
            report.imported.append({"case_id": case_id, "patient_id": patient_id, "split": split,
                                    "structures": names, "ct_series": series.series_uid,
                                    "rtstruct": str(rts.path), "voxels": int(np.count_nonzero(
                                        sitk.GetArrayViewFromImage(mask)))})
            report.warnings.extend(f"{patient_id}: {w}" for w in info.warnings)
        except _Skip as exc:
            skip(exc.reason, exc.message, exc.source)
        except Exception as exc:  # a case the code did not foresee still must not stop the batch
            skip("error", f"{type(exc).__name__}: {exc}")
    for patient_id in sorted(set(clinical) - set(by_patient)):
        report.skipped.append(SkippedCase(patient_id, "no-dicom", f"patient {patient_id!r} is in the clinical table "
                                                                  f"but not in the DICOM export"))

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["case_id"]))
    _write_text(manifest_path, buffer.getvalue())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("patient_id", "reason", "message", "source"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(s) for s in report.skipped)
    _write_text(out_dir / "skipped.csv", buffer.getvalue())
    _write_text(out_dir / "skipped.json", json.dumps([asdict(s) for s in report.skipped], indent=2))
    _write_text(out_dir / "import_report.json", json.dumps({**report.summary(), "cases": report.imported}, indent=2))
    return report


# -- command line ---------------------------------------------------------------------------------------
def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "import-dicom", help="convert planning CT + RTSTRUCT exports into a training manifest",
        description="Walk a folder of exported studies, pair each CT series with its RTSTRUCT, take the CTV "
                    "(union of the structures matching --pattern), join the clinical table by patient_id and write "
                    "NIfTI + manifest.csv. Every case not imported is listed in skipped.csv with the reason.")
    p.add_argument("--in", dest="in_dir", required=True, type=Path,
                   help="folder of DICOM exports (searched recursively)")
    p.add_argument("--clinical", required=True, type=Path, help="CSV keyed by patient_id with the note fields "
                                                                "(and optionally split)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--pattern", action="append", metavar="GLOB",
                   help=f"CTV structure-name pattern, case-insensitive; repeat; replaces the defaults "
                        f"({' '.join(DEFAULT_CTV_PATTERNS)})")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help=f"structure names never used; repeat; replaces the defaults "
                        f"({' '.join(DEFAULT_EXCLUDE_PATTERNS)})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(func=_cli_import)


def _cli_import(args) -> dict:
    """Run by ``mmcontour import-dicom``; returns the summary the CLI prints with --json ("failed" when no case
    was imported, so the command exits non-zero)."""
    import sys

    try:
        report = import_dicom(args.in_dir, args.clinical, args.out,
                              patterns=tuple(args.pattern or DEFAULT_CTV_PATTERNS),
                              exclude=tuple(args.exclude or DEFAULT_EXCLUDE_PATTERNS),
                              progress=not args.json and sys.stderr.isatty(), overwrite=args.overwrite)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    summary = report.summary()
    if not report.imported:
        summary["failed"] = True
    if not args.json:
        print(f"imported {summary['imported']} case(s) into {report.manifest}; skipped {summary['skipped']} "
              f"(listed in {report.out_dir / 'skipped.csv'})")
        for s in report.skipped:
            print(f"  skipped {s.patient_id or '?'} [{s.reason}]: {s.message}")
        for w in report.warnings:
            print(f"  note: {w}")
    return summary


__all__ = ["CTSeriesInfo", "DicomError", "DicomGeometryError", "NotCTError", "SeveralSeriesError", "WrongSeriesError",
           "NoMatchingStructureError", "EmptyContourError", "DEFAULT_CTV_PATTERNS", "DEFAULT_EXCLUDE_PATTERNS",
           "DEFAULT_ROI_TEMPLATE", "MANIFEST_COLUMNS", "read_ct_series", "scan_ct_series", "find_studies",
           "match_structures", "format_roi_name", "rtstruct_to_mask", "write_rtstruct", "write_dicom_seg",
           "add_export_arguments", "export_prediction", "import_dicom", "ImportReport", "SkippedCase", "split_for",
           "read_clinical_table", "register_cli", "Study", "SeriesRef", "RTStructRef"]
