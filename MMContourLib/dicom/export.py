"""DICOM RT out: a prediction written back as an RTSTRUCT or DICOM SEG that references the CT series it was
made on (``export_prediction``, used by ``mmcontour predict --out-rtstruct / --out-dicom-seg``). The series'
geometry is validated by ``image.ctseries``; importing a planning archive is ``dicom.archive``.

Library choice: pydicom reads every header and builds the RTSTRUCT (no maintained library writes an
RTSTRUCT from a mask on an arbitrary, possibly oblique, grid without pulling OpenCV in: rt-utils needs
opencv-python and assumes its own slice handling); highdicom builds the DICOM SEG, copying patient and
study from the CT; contourpy (matplotlib's marching squares) turns mask slices into closed polygons.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..image.ctseries import (RTSTRUCT_STORAGE, STUDY_COMPONENT_SOP_CLASS, DicomError, DicomGeometryError,
                              EmptyContourError, _ct_info)
from ..image.grid import Grid, check_same_grid
from ..image.fileio import OutputGroup, atomic_write as _atomic_write
from ..note.clinical import ClinicalNote
from ..note.structures import SIDE_MODIFIER, STRUCTURES, UNION, Structure, segment_color, structure_for

if TYPE_CHECKING:  # pydicom is imported where it is used, so `mmcontour --help` does not load it
    from pydicom.dataset import Dataset

#: TG-263-style ROI name for exports; ``{lat}`` becomes ``_L``, ``_R`` or nothing for both sides.
DEFAULT_ROI_TEMPLATE = "CTV{lat}"
DEFAULT_COLOR = (255, 0, 0)


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


def _check_color(color: Sequence[int] | str) -> list[int]:
    """``R,G,B`` (a string, as ``--roi-color`` gives it) or three numbers -> three integers 0-255."""
    parts = color.replace(" ", "").split(",") if isinstance(color, str) else list(color)
    try:
        rgb = [int(c) for c in parts]
    except (TypeError, ValueError):
        rgb = []
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        shown = repr(color) if isinstance(color, str) else str(tuple(color))
        raise ValueError(f"colour {shown} must be three integers 0-255 as R,G,B, e.g. 255,0,0 for red")
    return rgb


def check_export_options(roi_template: str, color: Sequence[int] | str, note: ClinicalNote | None) -> None:
    """Refuse a bad ROI name template or colour before anything runs (the writers check them again)."""
    format_roi_name(roi_template, note)
    _check_color(color)


def _write(path, write, group: OutputGroup | None) -> Path:
    return group.add(path, write) if group is not None else _atomic_write(Path(path), write)


@dataclass(frozen=True)
class _Roi:
    """One ROI / segment of an export: its name, mask, colour (0-255) and the structure-table row and side
    its codes come from."""
    name: str
    mask: sitk.Image
    rgb: list[int]
    row: Structure
    side: str | None

    @property
    def array(self) -> np.ndarray:  # (k, j, i) bool; made when written, so only one ROI's copy lives at a time
        return sitk.GetArrayViewFromImage(self.mask) > 0

    def region_modifier(self):
        return SIDE_MODIFIER.get(self.side) if self.row.region is not None else None


def _rois(masks, info, roi_name: str, color, colors: Mapping[str, Sequence[int] | str] | None,
          sides: Mapping[str, str] | None, structures: Mapping[str, str] | None) -> list[_Roi]:
    """The ROIs to write, in order: one mask (named ``roi_name``, coloured ``color``) or {ROI name: mask}
    (coloured ``colors[name]``, else its structure's table colour). A ROI's codes and colour come from the
    table row ``structures[name]`` names, else the row its own name names (``CTVn_L1_L`` -> CTVn_L1, left),
    else the CTV's; its side from ``sides[name]``, else that name's suffix. Empty masks are left out; all
    empty is an ``EmptyContourError``."""
    if isinstance(masks, sitk.Image):
        masks, colors = {roi_name: masks}, {**(colors or {}), roi_name: color}
    if not masks:
        raise ValueError("no mask to export")
    rois = []
    for i, (name, mask) in enumerate(masks.items()):
        if not name or len(name) > 64 or "\\" in name:
            raise ValueError(f"ROI name {name!r} must be 1-64 characters without a backslash")
        check_same_grid(mask, Grid(info.size, info.spacing, info.origin, info.direction),
                        f"the mask {name!r} is not on the grid of CT series {info.series_instance_uid}",
                        DicomGeometryError, "contour that CT, or resample the mask onto it first")
        if not sitk.GetArrayViewFromImage(mask).any():
            continue  # a structure the model did not draw: no ROI
        table_name = (structures or {}).get(name, name)
        row, named_side = structure_for(table_name)
        given = (colors or {}).get(name)
        rgb = _check_color(given) if given is not None else [round(255 * c) for c in segment_color(table_name, i)]
        rois.append(_Roi(name, mask, rgb, row or STRUCTURES[UNION], (sides or {}).get(name) or named_side))
    if not rois:
        what = "the mask is" if len(masks) == 1 else f"every mask ({', '.join(masks)}) is"
        raise EmptyContourError(f"{what} empty: there is no CTV to export")
    return rois


def write_rtstruct(masks: sitk.Image | Mapping[str, sitk.Image], ct_series_folder, out_path: str | os.PathLike,
                   roi_name: str = "CTV", color: Sequence[int] = DEFAULT_COLOR, algorithm_name: str = "MMContour",
                   algorithm_version: str = "0.1.0", description: str = "", group: OutputGroup | None = None, *,
                   colors: Mapping[str, Sequence[int]] | None = None, sides: Mapping[str, str] | None = None,
                   structures: Mapping[str, str] | None = None) -> Path:
    """Write ``masks`` (on the CT's grid) as an RTSTRUCT referencing the CT series: one mask (ROI ``roi_name``,
    colour ``color``) or {ROI name: mask}, one ROI each in order (names, colours, codes: ``_rois``; empty
    masks left out), every ROI RT ROI Interpreted Type CTV, with one CLOSED_PLANAR contour per boundary per
    slice (holes as inner contours), ROI generation AUTOMATIC with the algorithm's name and version,
    approval UNAPPROVED (a clinician reviews it). ``ct_series_folder``: folder, files or CTSeriesInfo."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    info = _ct_info(ct_series_folder)
    rois = _rois(masks, info, roi_name, color, colors, sides, structures)
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
    ds.SeriesDescription = (description or f"{algorithm_name} {algorithm_version} {' '.join(r.name for r in rois)}")[:64]
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
    to_physical = info.index_to_physical()
    ds.StructureSetROISequence, ds.ROIContourSequence = DicomSequence(), DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, entry in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = info.frame_of_reference_uid
        roi.ROIName = entry.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = DicomSequence([algorithm])
        ds.StructureSetROISequence.append(roi)

        array = entry.array
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
        roi_contour.ROIDisplayColor = entry.rgb
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = DicomSequence(contours)
        ds.ROIContourSequence.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType = "CTV"
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    ds.ApprovalStatus = "UNAPPROVED"
    return _write(out_path, lambda tmp: ds.save_as(tmp, enforce_file_format=True), group)


def write_dicom_seg(masks: sitk.Image | Mapping[str, sitk.Image], ct_series_folder, out_path: str | os.PathLike,
                    segment_label: str = "CTV", algorithm_name: str = "MMContour", algorithm_version: str = "0.1.0",
                    color: Sequence[int] = DEFAULT_COLOR, description: str = "", group: OutputGroup | None = None, *,
                    colors: Mapping[str, Sequence[int]] | None = None, sides: Mapping[str, str] | None = None,
                    structures: Mapping[str, str] | None = None) -> Path:
    """Write ``masks`` as a binary DICOM Segmentation (highdicom) referencing the CT series: one mask (label
    ``segment_label``, colour ``color``) or {segment label: mask}, one segment each in order (overlaps kept;
    names, colours, codes: ``_rois``; empty masks left out). Each segment: category and type from its
    structure-table row (RT Target / Clinical target volume, SCT 228792002), its anatomic region (the row's
    ``region``) with the side as the region modifier, algorithm AUTOMATIC with name and version."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    info = _ct_info(ct_series_folder)
    rois = _rois(masks, info, segment_label, color, colors, sides, structures)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm_version[:64])

    def concept(code) -> "hd.sr.CodedConcept":
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)

    descriptions = []
    for number, roi in enumerate(rois, start=1):
        segment = hd.seg.SegmentDescription(
            segment_number=number, segment_label=roi.name[:64], segmented_property_category=concept(roi.row.category),
            segmented_property_type=concept(roi.row.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(*roi.rgb),
            anatomic_regions=[concept(roi.row.region)] if roi.row.region is not None else None)
        modifier = roi.region_modifier()
        if modifier is not None:  # highdicom has no argument for it: the Segment Description macro's own attribute
            segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [concept(modifier)]
        descriptions.append(segment)
    pixels = np.stack([roi.array.view(np.uint8) for roi in rois], axis=-1)  # (frames, rows, columns, segments)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=1,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MMContour",
            manufacturer_model_name=algorithm_name[:64], software_versions=algorithm_version[:64],
            device_serial_number=algorithm_version[:64], content_label="CTV",
            content_description=(description or f"{algorithm_name} {algorithm_version}")[:64])
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(f"highdicom refused to build the DICOM SEG on series {info.series_instance_uid}: "
                         f"{exc}") from None
    return _write(out_path, lambda tmp: seg.save_as(tmp), group)


def export_prediction(masks: sitk.Image | Mapping[str, sitk.Image], ct_series, *, out_rtstruct=None,
                      out_dicom_seg=None, note: ClinicalNote | None = None, roi_template: str = DEFAULT_ROI_TEMPLATE,
                      color: Sequence[int] | str = DEFAULT_COLOR,
                      provenance: Mapping[str, str] | None = None, group: OutputGroup | None = None) -> dict[str, Path]:
    """Write the requested DICOM outputs for a prediction: ``masks`` is the CTV or {structure: mask}
    (``ContourResult.segments``), one ROI / segment each, empty ones left out. The union ``CTV`` is named by
    ``roi_template`` (``{lat}`` from the note) and coloured ``color``, its side the note's; every other
    structure keeps its table name (``CTVn_L1_L``), colour and codes. The algorithm name/version come from
    the Contourer's provenance (bundle name; bundle version or id), the prompt goes in the description.
    ``group``: stage them there, to appear with the run's other outputs or not at all."""
    color = _check_color(color)
    provenance = dict(provenance or {})
    name = provenance.get("bundle_name") or "MMContour"
    version = (provenance.get("bundle_version") or provenance.get("bundle_id") or provenance.get("mmcontour_version")
               or "unknown")
    prompt = provenance.get("prompt") or (note.to_prompt() if note is not None else "")
    description = f"{name} {version}; note: {prompt}" if prompt else ""
    roi_name = format_roi_name(roi_template, note)
    if isinstance(masks, sitk.Image):
        masks = {UNION: masks}
    named = {}
    for structure, mask in masks.items():
        key = roi_name if structure == UNION else structure
        if key in named:
            raise ValueError(f"ROI name {key!r} (from --roi-name {roi_template!r}) is also the name of a structure "
                             "in the output; give the CTV another name, e.g. 'CTV{lat}'")
        named[key] = mask
    options = dict(algorithm_name=name, algorithm_version=version, group=group)
    if UNION in masks:
        options.update(colors={roi_name: color}, structures={roi_name: UNION},
                       sides={roi_name: note.side} if note is not None and note.side else None)
    info = _ct_info(ct_series)
    written = {}
    if out_rtstruct:
        written["rtstruct"] = write_rtstruct(named, info, out_rtstruct, description=description, **options)
    if out_dicom_seg:
        written["dicom_seg"] = write_dicom_seg(named, info, out_dicom_seg, **options)
    return written
