"""DICOM RT out, and the CT-series geometry that reading and writing share.

This module validates a CT series from its headers (``scan_ct_series`` -> ``CTSeriesInfo``) and writes a
prediction back as an RTSTRUCT or DICOM SEG referencing that series (``export_prediction``, used by
``mmcontour predict --out-rtstruct / --out-dicom-seg``). The import side (reading a CT series and RTSTRUCTs
into images and masks, ``mmcontour import-dicom``) is ``dicom_import``.

Library choice: pydicom reads every header and builds the RTSTRUCT (no maintained library writes an
RTSTRUCT from a mask on an arbitrary, possibly oblique, grid without pulling OpenCV in: rt-utils needs
opencv-python and assumes its own slice handling); highdicom builds the DICOM SEG, copying patient and
study from the CT; contourpy (matplotlib's marching squares) turns mask slices into closed polygons.

Geometry is validated by us, not left to a reader's guess: a series must be one CT series with one
orientation, slices stacked perpendicular to their plane (a gantry tilt that shears the volume is
refused), no duplicate positions and uniform spacing (a missing slice is refused with its position).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .fileio import atomic_write as _atomic_write
from .note import ClinicalNote

if TYPE_CHECKING:  # pydicom is imported where it is used, so `mmcontour --help` does not load it
    from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
#: The RT Referenced Study's SOP class that RT objects conventionally name (Detached Study Management).
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

#: TG-263-style ROI name for exports; ``{lat}`` becomes ``_L``, ``_R`` or nothing for both sides.
DEFAULT_ROI_TEMPLATE = "CTV{lat}"
DEFAULT_COLOR = (255, 0, 0)


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


# -- ROI names ------------------------------------------------------------------------------------
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


#: Public names of the import side, which moved to ``dicom_import``; ``dicomrt.<name>`` still finds them.
_MOVED_TO_DICOM_IMPORT = frozenset({
    "DEFAULT_CTV_PATTERNS", "DEFAULT_EXCLUDE_PATTERNS", "MANIFEST_COLUMNS", "SPLIT_FRACTIONS", "read_ct_series",
    "match_structures", "rtstruct_to_mask", "find_studies", "import_dicom", "ImportReport", "SkippedCase",
    "split_for", "read_clinical_table", "Study", "SeriesRef", "RTStructRef"})


def __getattr__(name: str):
    if name in _MOVED_TO_DICOM_IMPORT:
        from . import dicom_import

        return getattr(dicom_import, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CTSeriesInfo", "DicomError", "DicomGeometryError", "NotCTError", "SeveralSeriesError", "WrongSeriesError",
           "NoMatchingStructureError", "EmptyContourError", "DEFAULT_ROI_TEMPLATE", "DEFAULT_COLOR", "scan_ct_series",
           "format_roi_name", "write_rtstruct", "write_dicom_seg", "add_export_arguments", "export_prediction"]
