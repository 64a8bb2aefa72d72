"""A CT series from its DICOM files: headers validated into one grid (``scan_ct_series`` -> ``CTSeriesInfo``)
and the pixels read in HU on it (``read_ct_series``). Shared by image reading (a DICOM folder as a CT), RT
export (which references the series) and archive import.

Geometry is validated by us, not left to a reader's guess: a series must be one CT series with one
orientation, slices stacked perpendicular to their plane (a gantry tilt that shears the volume is
refused), no duplicate positions and uniform spacing (a missing slice is refused with its position).
SimpleITK (GDCM) decodes the pixels, so JPEG lossless / JPEG 2000 exports read as well as uncompressed ones.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .grid import Grid, check_same_grid

if TYPE_CHECKING:  # pydicom is imported where it is used, so `mmcontour --help` does not load it
    from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
#: The RT Referenced Study's SOP class that RT objects conventionally name (Detached Study Management).
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"



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


# -- CT series: sort, validate ---------------------------------------------------------------------
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


def _ct_info(ct_series) -> CTSeriesInfo:
    return ct_series if isinstance(ct_series, CTSeriesInfo) else scan_ct_series(ct_series)


def _check_on_grid(mask: sitk.Image, info: CTSeriesInfo) -> np.ndarray:
    """The mask as a (k, j, i) bool array, after checking it lies on the CT's own grid."""
    check_same_grid(mask, Grid(info.size, info.spacing, info.origin, info.direction),
                    f"the mask is not on the grid of CT series {info.series_instance_uid}", DicomGeometryError,
                    "contour that CT, or resample the mask onto it first")
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        raise EmptyContourError("the mask is empty: there is no CTV to export")
    return array


# -- CT series: read -------------------------------------------------------------------------------
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
