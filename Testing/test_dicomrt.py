"""DICOM RT in and out on phantoms written here with pydicom (independent of the code under test).

The CT series and the reference RTSTRUCTs are built by hand in this file: analytic ellipse contours of an
ellipsoid CTV, several orientations, gantry-tilt metadata, broken series. ``dciodvfy`` (Debian's
dicom3tools) checks the exported objects when it is installed; the structural checks run without it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from MMContourLib.cli import import_dicom as import_dicom_cli
from MMContourLib.cli.predict import add_export_arguments
from MMContourLib.dicom import archive as dicom_import
from MMContourLib.dicom import export as dicomrt
from MMContourLib.dicom.archive import rtstruct_to_mask
from MMContourLib.dicom.export import write_dicom_seg, write_rtstruct
from MMContourLib.image import ctseries
from MMContourLib.image.ctseries import (DicomError, DicomGeometryError, EmptyContourError, NotCTError,
                                         WrongSeriesError, read_ct_series)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

SHAPE = (20, 64, 64)  # (k, j, i)
SPACING = (1.5, 1.25, 2.5)  # (i, j, k) mm
CTV_CENTRE, CTV_RADII = np.array([44.0, 38.0, 25.0]), np.array([18.0, 14.0, 17.0])  # local mm (u, v, w)
ROT = np.radians(15)
ORIENTATIONS = {  # row direction, column direction (the slice normal is their cross product)
    "axial": ((1, 0, 0), (0, 1, 0)),
    "axial-flipped": ((-1, 0, 0), (0, 1, 0)),
    "oblique-tilted": ((1, 0, 0), (0, np.cos(ROT), np.sin(ROT))),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def phantom(shape=SHAPE, spacing=SPACING, centre=CTV_CENTRE, radii=CTV_RADII):
    """(HU volume int16, CTV bool) in (k, j, i): a body ellipse and an ellipsoid CTV judged at voxel centres."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    u, v, w = i * spacing[0], j * spacing[1], k * spacing[2]
    ctv = ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2 + ((w - centre[2]) / radii[2]) ** 2 <= 1
    body = ((i - shape[2] / 2) / (0.45 * shape[2])) ** 2 + ((j - shape[1] / 2) / (0.4 * shape[1])) ** 2 <= 1
    hu = np.where(body, 40, -1000) + (k * 3 + i % 7)
    hu[ctv] = 20
    return hu.astype(np.int16), ctv


class Series:
    """A CT (or MR) series written slice by slice, with its geometry for the expectations."""

    def __init__(self, folder: Path, hu: np.ndarray, orientation=ORIENTATIONS["axial"], spacing=SPACING,
                 origin=(-40.0, -60.0, 100.0), patient_id="P001", modality="CT", study_uid=None, tilt=None,
                 shear=0.0, drop=(), duplicate=(), uneven=None, seed=0):
        self.folder = Path(folder)
        self.row, self.col = (np.asarray(v, float) for v in orientation)
        self.normal = np.cross(self.row, self.col)
        self.spacing, self.origin, self.patient_id = spacing, np.asarray(origin, float), patient_id
        self.study_uid = study_uid or generate_uid()
        self.series_uid, self.for_uid = generate_uid(), generate_uid()
        self.sop_uids, self.positions = [], []
        self.folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        names = rng.permutation(len(hu) + len(duplicate))  # file names do not follow slice order
        for k in range(len(hu)):
            w = k * spacing[2] + (0.7 if uneven is not None and k >= uneven else 0.0)
            pos = self.origin + w * self.normal + k * shear * self.col
            self.positions.append(pos)
            self.sop_uids.append(generate_uid())
            if k not in drop:
                self._write(k, hu[k], pos, self.sop_uids[k], f"IM{names[k]:04d}.dcm", modality, tilt)
        for n, k in enumerate(duplicate):
            self._write(k, hu[k], self.positions[k], generate_uid(), f"IM{names[len(hu) + n]:04d}.dcm", modality, tilt)

    def _write(self, k, hu_slice, pos, sop_uid, name, modality, tilt):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, sop_uid
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.Modality = "20240102", "101500", "ACC1", modality
        ds.Manufacturer, ds.ReferringPhysicianName = "Phantom", "Ref^Doc"
        ds.PatientName, ds.PatientID = f"Test^{self.patient_id}", self.patient_id
        ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID = self.study_uid, self.series_uid, "S1"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = self.for_uid, ""
        ds.PatientPosition, ds.Laterality = "HFS", ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*self.row, *self.col)]
        ds.PixelSpacing = [self.spacing[1], self.spacing[0]]  # row spacing, column spacing
        ds.SliceThickness = self.spacing[2]
        if tilt is not None:
            ds.GantryDetectorTilt = tilt
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu_slice.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType, ds.KVP = -1024, 1, "HU", 120
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 10, 500, 1, 1.5
        ds.PixelData = np.clip(hu_slice.astype(np.int32) + 1024, 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(self.folder / name, enforce_file_format=True)

    def to_physical(self, uvw: np.ndarray) -> np.ndarray:
        return self.origin + uvw[:, :1] * self.row + uvw[:, 1:2] * self.col + uvw[:, 2:3] * self.normal

    def direction(self) -> np.ndarray:
        return np.column_stack([self.row, self.col, self.normal]).ravel()


def ellipse_contours(series: Series, centre=CTV_CENTRE, radii=CTV_RADII, slices=None, n=128):
    """Analytic cross-sections of the ellipsoid on each slice plane: {k: (n, 3) LPS points}."""
    out = {}
    for k in range(SHAPE[0]) if slices is None else slices:
        w = k * series.spacing[2]
        f = 1 - ((w - centre[2]) / radii[2]) ** 2
        if f <= 0.01:
            continue
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        uvw = np.column_stack([centre[0] + radii[0] * np.sqrt(f) * np.cos(t),
                               centre[1] + radii[1] * np.sqrt(f) * np.sin(t), np.full(n, w)])
        out[k] = series.to_physical(uvw)
    return out


def write_reference_rtstruct(path: Path, series: Series, structures: dict, referenced_series_uid=None,
                             for_uid=None, patient_id=None):
    """A plain RTSTRUCT as a planning system writes it; ``structures``: {name: {k: points}}."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "RTSTRUCT", patient_id or series.patient_id, "Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_uid, generate_uid()
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "TPS", "20240103", "120000"
    for_uid = for_uid or series.for_uid
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = referenced_series_uid or series.series_uid
    ref_series.ContourImageSequence = Sequence()
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID, ref_study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", series.study_uid
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_for])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(structures.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, for_uid, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [0, 255, 0]
        item.ContourSequence = Sequence()
        for k, points in contours.items():
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            contour.ContourData = [f"{v:.5f}" for v in np.asarray(points).ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")


# -- reading and geometry ------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_series_and_rtstruct_import_on_every_orientation(tmp_path, orientation):
    hu, ctv = phantom()
    tilt = 15.0 if orientation == "oblique-tilted" else None
    series = Series(tmp_path / "ct", hu, ORIENTATIONS[orientation], tilt=tilt)
    image, info = read_ct_series(series.folder)

    # the exact grid: origin at the first slice along the normal, spacing, direction, HU values
    np.testing.assert_allclose(image.GetOrigin(), series.positions[0], atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), series.direction(), atol=1e-6)
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
    assert info.sop_instance_uids == tuple(series.sop_uids)
    assert info.gantry_tilt == (tilt or 0.0) and bool(info.warnings) == bool(tilt)

    # the CTV drawn as two structures (united), next to structures that must not be taken
    contours = ellipse_contours(series)
    ks = sorted(contours)
    structures = {"CTVp_Breast_L": {k: contours[k] for k in ks[: len(ks) // 2]},
                  "CTVn_L1_L": {k: contours[k] for k in ks[len(ks) // 2:]},
                  "PTV_Breast_L": ellipse_contours(series, radii=CTV_RADII + 6),
                  "CTV_Boost": ellipse_contours(series, centre=CTV_CENTRE - 20, radii=CTV_RADII / 2),
                  "Heart": ellipse_contours(series, centre=CTV_CENTRE + 10)}
    rts = write_reference_rtstruct(tmp_path / "rs.dcm", series, structures)
    mask = rtstruct_to_mask(rts, image, info)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection() and mask.GetSpacing() == image.GetSpacing()
    assert dice(sitk.GetArrayFromImage(mask), ctv) >= 0.98

    # export, then import again: the predicted CTV comes back
    out = write_rtstruct(mask, series.folder, tmp_path / "out" / "ctv.dcm")
    again = rtstruct_to_mask(out, image, info)
    assert dice(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(mask)) >= 0.98


@pytest.mark.parametrize("broken, words", [
    (dict(drop=(7,)), ["missing", "IM"]),
    (dict(duplicate=(5,)), ["occur twice"]),
    (dict(tilt=15.0, shear=SPACING[2] * np.tan(ROT)), ["gantry tilt", "15"]),
    (dict(shear=0.5), ["sheared"]),
    (dict(uneven=10), ["not uniform"]),
])
def test_broken_series_are_refused_with_a_clear_message(tmp_path, broken, words):
    hu, _ = phantom(shape=(12, 24, 24))
    series = Series(tmp_path / "ct", hu, **broken)
    with pytest.raises(DicomGeometryError) as err:
        read_ct_series(series.folder)
    for word in words:
        assert word in str(err.value)
    assert series.series_uid in str(err.value)


def test_a_copied_file_is_read_once_and_other_objects_are_ignored(tmp_path):
    hu, _ = phantom(shape=(6, 24, 24))
    series = Series(tmp_path / "ct", hu)
    first = sorted(series.folder.iterdir())[0]
    shutil.copy(first, series.folder / "copy.dcm")
    (series.folder / "notes.txt").write_text("not DICOM")
    write_reference_rtstruct(series.folder / "rs.dcm", series, {})
    image, info = read_ct_series(series.folder)
    assert image.GetSize() == (24, 24, 6)
    assert any("second copy" in w for w in info.warnings)


def test_wrong_inputs_name_the_problem(tmp_path):
    hu, ctv = phantom(shape=(8, 32, 32), centre=(24, 20, 8), radii=(10, 8, 7))
    mr = Series(tmp_path / "mr", hu, modality="MR")
    with pytest.raises(NotCTError, match="MR"):
        read_ct_series(mr.folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM image"):
        read_ct_series(tmp_path / "empty")
    Series(tmp_path / "two" / "a", hu)
    Series(tmp_path / "two" / "b", hu)
    with pytest.raises(ctseries.SeveralSeriesError, match="2 CT series"):
        read_ct_series(tmp_path / "two")

    ct = Series(tmp_path / "ct", hu)
    image, info = read_ct_series(ct.folder)
    mask = sitk.GetImageFromArray(ctv.astype(np.uint8))
    mask.CopyInformation(image)
    with pytest.raises(EmptyContourError, match="empty"):
        write_rtstruct(mask * 0, ct.folder, tmp_path / "x.dcm")
    shifted = sitk.Image(mask)
    shifted.SetOrigin(tuple(np.add(image.GetOrigin(), (5, 0, 0))))
    with pytest.raises(DicomGeometryError, match="not on the grid"):
        write_rtstruct(shifted, ct.folder, tmp_path / "x.dcm")
    with pytest.raises(NotCTError):
        write_rtstruct(mask, mr.folder, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()

    other = Series(tmp_path / "other", hu)
    rts = write_reference_rtstruct(tmp_path / "rs_other.dcm", other, {"CTV": ellipse_contours(other)})
    with pytest.raises(WrongSeriesError, match=other.series_uid):
        rtstruct_to_mask(rts, image, info)
    rts = write_reference_rtstruct(tmp_path / "rs_names.dcm", ct, {"Heart": ellipse_contours(ct), "PTV": {}})
    with pytest.raises(ctseries.NoMatchingStructureError, match="Heart"):
        rtstruct_to_mask(rts, image, info)
    rts = write_reference_rtstruct(tmp_path / "rs_empty.dcm", ct, {"CTV": {}})
    with pytest.raises(EmptyContourError):
        rtstruct_to_mask(rts, image, info)


# -- export: what the planning system receives ------------------------------------------------------------
def ring_mask(image: sitk.Image) -> sitk.Image:
    """Two islands, one with a hole, touching the image border: the hard cases for contours."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.GetSize()[::-1]), indexing="ij")
    r = np.hypot(i - 20, j - 24)
    arr = ((r <= 11) & (r >= 4) & (k >= 2) & (k <= 8)) | ((i >= 36) & (j >= 50) & (k == 5))
    arr[4, 30, 40] = True  # a single voxel
    mask = sitk.GetImageFromArray(arr.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    hu, _ = phantom(shape=(12, 56, 48))
    series = Series(tmp / "ct", hu, ORIENTATIONS["oblique-tilted"], tilt=15.0)
    image, info = read_ct_series(series.folder)
    mask = ring_mask(image)
    rts = write_rtstruct(mask, series.folder, tmp / "rs.dcm", roi_name="CTV_L", color=(10, 200, 30),
                         algorithm_name="tiny-bundle", algorithm_version="2.1", description="note: N1, bcs, left")
    seg = write_dicom_seg(mask, info, tmp / "seg.dcm", segment_label="CTV_L", algorithm_name="tiny-bundle",
                          algorithm_version="2.1")
    return series, image, info, mask, rts, seg


def test_rtstruct_references_the_ct_and_round_trips_exactly(exported):
    series, image, info, mask, path, _ = exported
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RTSTRUCT_STORAGE and ds.Modality == "RTSTRUCT"
    ct = pydicom.dcmread(next(series.folder.iterdir()), stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "StudyDate", "AccessionNumber", "ReferringPhysicianName"):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    ref_for = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref_for.FrameOfReferenceUID == series.for_uid
    ref_series = ref_for.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == series.series_uid
    assert [i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence] == series.sop_uids
    roi = ds.StructureSetROISequence[0]
    assert (roi.ROIName, roi.ROIGenerationAlgorithm, roi.ReferencedFrameOfReferenceUID) == \
        ("CTV_L", "AUTOMATIC", series.for_uid)
    algorithm = roi.ROIDerivationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny-bundle", "2.1")
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "CTV"
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [10, 200, 30]

    # each contour is closed planar, in the plane of the slice it references
    index = {uid: k for k, uid in enumerate(series.sop_uids)}
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len(contours) >= 2 * 7 + 2  # outer + hole on 7 slices, the island, the single voxel
    for c in contours:
        assert c.ContourGeometricType == "CLOSED_PLANAR"
        pts = np.array(c.ContourData, float).reshape(-1, 3)
        assert len(pts) == c.NumberOfContourPoints >= 3 and not np.allclose(pts[0], pts[-1])
        k = index[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose((pts - series.positions[k]) @ series.normal, 0, atol=1e-3)

    again = rtstruct_to_mask(path, image, info)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(mask))


def test_dicom_seg_references_the_ct_and_holds_the_mask(exported):
    import highdicom as hd

    series, image, info, mask, _, path = exported
    seg = hd.seg.segread(path)
    assert seg.SeriesInstanceUID != series.series_uid and seg.PatientID == series.patient_id
    assert seg.StudyInstanceUID == series.study_uid and seg.FrameOfReferenceUID == series.for_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    segment = seg.SegmentSequence[0]
    assert (segment.SegmentLabel, segment.SegmentAlgorithmType, segment.SegmentAlgorithmName) == \
        ("CTV_L", "AUTOMATIC", "tiny-bundle")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], sitk.GetArrayFromImage(mask))


@needs_dciodvfy
def test_exports_pass_dciodvfy(exported):
    *_, rts, seg = exported
    assert dciodvfy_errors(rts) == []
    assert dciodvfy_errors(seg) == []


def test_roi_names_and_structure_patterns():
    from MMContourLib.note.clinical import ClinicalNote

    note = ClinicalNote.parse("N1, breast conserving surgery, left side")
    assert dicomrt.format_roi_name(note=note) == "CTV_L"
    assert dicomrt.format_roi_name("CTVp_Breast{lat}", note.replace(side="right")) == "CTVp_Breast_R"
    assert dicomrt.format_roi_name(note=ClinicalNote.parse("N0, bcs, left; N2, total mastectomy, right")) == "CTV"
    with pytest.raises(ValueError, match="TG-263"):
        dicomrt.format_roi_name("CTV breast left side{lat}", note)
    names = ["CTV", "ctvp_breast_l", "CTVn_IMN_L", "CTV_CW", "CTV_4500", "PTV_Breast_L", "zCTV_old", "CTV_Boost",
             "CTV_TB", "Heart", "CTV_Eval"]
    assert dicom_import.match_structures(names) == ["CTV", "ctvp_breast_l", "CTVn_IMN_L", "CTV_CW", "CTV_4500"]
    assert dicom_import.match_structures(names, patterns=["Heart"]) == ["Heart"]


def test_export_prediction_uses_provenance_and_note(tmp_path):
    from MMContourLib.note.clinical import ClinicalNote

    hu, ctv = phantom(shape=(8, 32, 32), centre=(24, 20, 8), radii=(10, 8, 7))
    series = Series(tmp_path / "ct", hu)
    image, _ = read_ct_series(series.folder)
    mask = sitk.GetImageFromArray(ctv.astype(np.uint8))
    mask.CopyInformation(image)
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(["--out-rtstruct", str(tmp_path / "rs.dcm"), "--roi-name", "CTVp_Breast{lat}",
                              "--roi-color", "0,0,255"])
    written = dicomrt.export_prediction(
        mask, series.folder, out_rtstruct=args.out_rtstruct, out_dicom_seg=args.out_dicom_seg,
        note=ClinicalNote.parse("N0, bcs, right side"), roi_template=args.roi_name, color=args.roi_color,
        provenance={"bundle_name": "llmseg-tiny", "bundle_id": "abc123", "prompt": "N0, bcs, right side"})
    ds = pydicom.dcmread(written["rtstruct"])
    roi = ds.StructureSetROISequence[0]
    assert roi.ROIName == "CTVp_Breast_R" and list(ds.ROIContourSequence[0].ROIDisplayColor) == [0, 0, 255]
    assert roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName == "llmseg-tiny"
    assert roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmVersion == "abc123"
    assert "N0, bcs, right side" in ds.StructureSetDescription


# -- several structures: one ROI / segment each, in every output format ---------------------------------
def structure_result(image: sitk.Image, note_text: str = "N1, bcs, left side"):
    """A ContourResult made by hand (no model): the phantom's CTV split into CTVp_Breast_L (lower slices)
    and CTVn_L1_L (upper slices), plus a small CTVn_IMN_R block; every other structure empty."""
    from MMContourLib.inference.contourer import ContourResult
    from MMContourLib.note.clinical import ClinicalNote
    from MMContourLib.note.structures import structure_classes

    classes = structure_classes()
    _, ctv = phantom()
    labels = np.zeros(ctv.shape, np.uint8)
    middle = int(np.median(np.flatnonzero(ctv.any(axis=(1, 2)))))
    labels[:middle][ctv[:middle]] = 1 + classes.index("CTVp_Breast_L")
    labels[middle:][ctv[middle:]] = 1 + classes.index("CTVn_L1_L")
    labels[3:6, 5:9, 50:56] = 1 + classes.index("CTVn_IMN_R")
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    mask = sitk.Cast(label_image > 0, sitk.sitkUInt8)
    note = ClinicalNote.parse(note_text)
    return ContourResult(mask, sitk.Cast(mask, sitk.sitkFloat32), note, note.to_prompt(),
                         {"bundle_name": "tiny-structures", "bundle_id": "s1", "prompt": note.to_prompt()},
                         labels=label_image, classes=classes)


def table_rgb(name: str) -> list[int]:
    from MMContourLib.note.structures import segment_color

    return [round(255 * c) for c in segment_color(name)]


def test_every_output_writes_each_structure_with_its_name_colour_and_codes(tmp_path):
    import highdicom as hd
    import slicerio

    from MMContourLib.image.readwrite import read_segmentation, write_segmentation
    from MMContourLib.note.structures import SIDE_MODIFIER, structure_for

    series = Series(tmp_path / "ct", phantom()[0])
    image, info = read_ct_series(series.folder)
    result = structure_result(image)
    segments = result.segments("both")
    assert list(segments) == ["CTV", "CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_R"]  # CTV first, then table order
    arrays = {name: sitk.GetArrayFromImage(m).astype(bool) for name, m in segments.items()}
    assert all(a.any() for a in arrays.values())

    # .seg.nrrd: one layer per segment, the table's colour and terminology (CTV: the note's side)
    path = write_segmentation(tmp_path / "r.seg.nrrd", segments, sides={"CTV": result.note.side})
    back = read_segmentation(path)
    assert list(back) == list(segments)
    for name in segments:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back[name]).astype(bool), arrays[name])
    for entry in slicerio.read_segmentation(str(path))["segments"]:
        row, side = structure_for(entry["name"])
        side = side or "left"  # the CTV's: the note's
        np.testing.assert_allclose(entry["color"], row.color, atol=1e-6)
        terms = entry["terminology"]
        assert terms["category"] == ["DCM", "130041", "RT Target"]
        assert terms["type"] == ["SCT", "228792002", "Clinical target volume"]
        assert terms["anatomicRegion"] == [row.region.scheme, row.region.value, row.region.meaning]
        modifier = SIDE_MODIFIER[side]
        assert terms["anatomicRegionModifier"] == [modifier.scheme, modifier.value, modifier.meaning]

    written = dicomrt.export_prediction(segments, series.folder, out_rtstruct=tmp_path / "rs.dcm",
                                        out_dicom_seg=tmp_path / "seg.dcm", note=result.note, color="0,0,255",
                                        provenance=result.provenance)
    roi_names = ["CTV_L", "CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_R"]  # --roi-name names only the CTV
    by_roi = dict(zip(roi_names, arrays.values()))

    # RTSTRUCT: one ROI, colour, observation and contour set each; each comes back on its own
    ds = pydicom.dcmread(written["rtstruct"])
    assert [r.ROIName for r in ds.StructureSetROISequence] == roi_names
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == [1, 2, 3, 4]
    assert [int(c.ReferencedROINumber) for c in ds.ROIContourSequence] == [1, 2, 3, 4]
    assert [list(c.ROIDisplayColor) for c in ds.ROIContourSequence] == \
        [[0, 0, 255]] + [table_rgb(n) for n in roi_names[1:]]  # --roi-color colours only the CTV
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["CTV"] * 4
    assert [int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence] == [1, 2, 3, 4]
    index = {uid: k for k, uid in enumerate(series.sop_uids)}
    for name, item in zip(roi_names, ds.ROIContourSequence):
        slices = {index[c.ContourImageSequence[0].ReferencedSOPInstanceUID] for c in item.ContourSequence}
        assert slices == set(np.flatnonzero(by_roi[name].any(axis=(1, 2))).tolist()), name
        again = rtstruct_to_mask(written["rtstruct"], image, info, patterns=[name], exclude=())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(again).astype(bool), by_roi[name])

    # DICOM SEG: one segment each, RT Target / CTV, the table's anatomic region with the side as modifier
    seg = hd.seg.segread(written["dicom_seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == roi_names
    sides = {"CTV_L": "left", "CTVp_Breast_L": "left", "CTVn_L1_L": "left", "CTVn_IMN_R": "right"}
    for number, (item, name) in enumerate(zip(seg.SegmentSequence, roi_names), start=1):
        row, _ = structure_for(name)
        assert int(item.SegmentNumber) == number
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "130041"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "228792002"
        region = item.AnatomicRegionSequence[0]
        assert (region.CodingSchemeDesignator, region.CodeValue) == (row.region.scheme, row.region.value), name
        assert region.AnatomicRegionModifierSequence[0].CodeValue == SIDE_MODIFIER[sides[name]].value
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_uids,
                                                   segment_numbers=[number])
        np.testing.assert_array_equal(pixels[..., 0].astype(bool), by_roi[name])
    assert {"CTVn_IMN": "245282001", "CTVn_L1": "68171009"} == \
        {structure_for(n)[0].name: structure_for(n)[0].region.value for n in roi_names[2:]}
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(written["rtstruct"]) == [] and dciodvfy_errors(written["dicom_seg"]) == []


def test_structure_modes_empty_structures_and_name_clashes(tmp_path):
    series = Series(tmp_path / "ct", phantom()[0])
    image, info = read_ct_series(series.folder)
    result = structure_result(image)

    def rois(masks, **options):
        path = dicomrt.export_prediction(masks, info, out_rtstruct=tmp_path / "rs.dcm", note=result.note,
                                         **options)["rtstruct"]
        names = [r.ROIName for r in pydicom.dcmread(path).StructureSetROISequence]
        path.unlink()
        return names

    assert rois(result.segments("union")) == ["CTV_L"]
    assert rois(result.segments("regions")) == ["CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_R"]  # no CTV
    assert rois(result.mask, roi_template="CTVp_Breast{lat}") == ["CTVp_Breast_L"]  # one mask: as before
    # a structure the model did not draw is no ROI / segment; nothing at all drawn is refused
    empty = sitk.Image(result.mask) * 0
    assert rois({"CTV": result.mask, "CTVn_L2_L": empty}) == ["CTV_L"]
    seg = dicomrt.write_dicom_seg({"CTVn_L2_L": empty, "CTVn_L1_L": result.structures["CTVn_L1_L"]}, info,
                                  tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in pydicom.dcmread(seg).SegmentSequence] == ["CTVn_L1_L"]
    with pytest.raises(EmptyContourError, match=r"CTV_L, CTVn_L2_L\) is empty"):
        rois({"CTV": empty, "CTVn_L2_L": empty})
    # the CTV's ROI name may not take a structure's
    with pytest.raises(ValueError, match="CTVn_L1_L"):
        rois(result.segments("both"), roi_template="CTVn_L1{lat}")
    assert not (tmp_path / "rs.dcm").exists()


# -- import-dicom: a hospital export with good and bad cases ----------------------------------------------
def test_import_dicom_builds_the_manifest_and_reports_every_skip(tmp_path, capsys):
    small = dict(shape=(8, 32, 32), centre=(24, 20, 8), radii=(10, 8, 7))
    hu, ctv = phantom(**small)
    root = tmp_path / "export"

    def case(pid, name="CTV", orientation="axial", **kw):
        s = Series(root / pid / "CT", hu, ORIENTATIONS[orientation], patient_id=pid, **kw)
        c = ellipse_contours(s, centre=small["centre"], radii=small["radii"], slices=range(8))
        return s, c

    s, c = case("P01")
    write_reference_rtstruct(root / "P01" / "RS.dcm", s, {"CTVp_Breast_L": c, "Heart": c})
    s, c = case("P02", orientation="axial-flipped")
    write_reference_rtstruct(root / "P02" / "RS.dcm", s, {"CTV_CW": c})
    case("P03")  # no RTSTRUCT
    s, c = case("P04")
    write_reference_rtstruct(root / "P04" / "RS.dcm", s, {"Heart": c, "Lung_L": c})  # no CTV
    s, c = case("P05")
    write_reference_rtstruct(root / "P05" / "RS.dcm", s, {"CTV": c}, referenced_series_uid=generate_uid(),
                             for_uid=generate_uid())  # drawn on a series not in the export
    s, c = case("P06", drop=(3,))  # broken geometry
    write_reference_rtstruct(root / "P06" / "RS.dcm", s, {"CTV": c})
    s = Series(root / "P07" / "MR", hu, patient_id="P07", modality="MR")
    write_reference_rtstruct(root / "P07" / "RS.dcm", s, {"CTV": ellipse_contours(s, slices=range(8))})
    s, c = case("P08")
    write_reference_rtstruct(root / "P08" / "RS.dcm", s, {"CTV": c})  # no clinical row
    s, c = case("P09")
    write_reference_rtstruct(root / "P09" / "RS.dcm", s, {"CTV": c})  # invalid clinical row
    s, c = case("P10")
    write_reference_rtstruct(root / "P10" / "RS.dcm", s, {"CTV": {}})  # empty contour
    for n in (1, 2):  # two planning CTs with a CTV each
        s = Series(root / "P11" / f"CT{n}", hu, patient_id="P11")
        write_reference_rtstruct(root / "P11" / f"RS{n}.dcm", s, {"CTV": ellipse_contours(s, slices=range(8))})
    other = Series(tmp_path / "elsewhere", hu, patient_id="P12")
    (root / "P12").mkdir()
    write_reference_rtstruct(root / "P12" / "RS.dcm", other, {"CTV": ellipse_contours(other, slices=range(8))})
    (root / "README.txt").write_text("export notes")

    table = tmp_path / "clinical.csv"
    fields = ["patient_id", "age", "side", "t_stage", "n_stage", "m_stage", "surgery", "chemotherapy", "pathology"]
    rows = [[p, "61", "left", "T2", "pN1a", "M0", "lumpectomy", "adjuvant", "IDC"]
            for p in ("P01", "P03", "P04", "P05", "P06", "P07", "P10", "P11", "P12", "P99")]
    rows += [["P02", "", "right", "", "N0", "", "mastectomy", "", ""],
             ["P09", "61", "left", "", "NX", "", "bcs", "", ""]]
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([fields] + rows)

    parser = argparse.ArgumentParser()
    import_dicom_cli.register(parser.add_subparsers())
    out = tmp_path / "dataset"
    args = parser.parse_args(["import-dicom", "--in", str(root), "--clinical", str(table), "--out", str(out), "--json"])
    summary = args.func(args)  # what `mmcontour import-dicom --json` prints
    assert capsys.readouterr().out == "" and json.loads(json.dumps(summary)) == summary
    assert summary["imported"] == 2 and not summary.get("failed")

    with (out / "manifest.csv").open() as fh:
        reader = csv.DictReader(fh)
        manifest = list(reader)
    # P01's CTVp_Breast_L and P02's CTV_CW name regions (dicom.structure_map), so the cases have a regions map
    assert tuple(reader.fieldnames) == dicom_import.MANIFEST_COLUMNS + ("regions",)
    assert [r["case_id"] for r in manifest] == ["P01", "P02"]
    assert manifest[0]["n_stage"] == "N1" and manifest[0]["surgery"] == "bcs" and manifest[1]["side"] == "right"
    assert all(r["split"] == dicom_import.split_for(r["case_id"]) for r in manifest)
    for r in manifest:
        ct_img, mask = sitk.ReadImage(str(out / r["ct"])), sitk.ReadImage(str(out / r["ctv"]))
        assert ct_img.GetSize() == mask.GetSize() == (32, 32, 8)
        np.testing.assert_allclose(mask.GetOrigin(), ct_img.GetOrigin(), atol=1e-4)
        assert dice(sitk.GetArrayFromImage(mask), ctv) >= 0.98

    skipped = json.loads((out / "skipped.json").read_text())
    reasons = {(s["patient_id"], s["reason"]) for s in skipped}
    expected = {("P03", "no-rtstruct"), ("P04", "no-matching-structure"), ("P05", "wrong-series"),
                ("P06", "broken-geometry"), ("P07", "non-ct-modality"), ("P08", "missing-clinical-row"),
                ("P09", "invalid-clinical-row"), ("P10", "empty-contour"), ("P11", "several-ct-series"),
                ("P12", "no-ct"), ("P99", "no-dicom")}
    assert reasons == expected
    messages = {s["patient_id"]: s["message"] for s in skipped}
    assert "Heart" in messages["P04"] and "missing" in messages["P06"] and "NX" in messages["P09"]
    with (out / "skipped.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(skipped)
    assert summary["skipped_by_reason"]["no-rtstruct"] == 1 and summary["ignored_files"] == 1

    # a second run does not overwrite the manifest unless asked to
    with pytest.raises(ValueError, match="--overwrite"):
        args.func(args)


def test_phantom_case_round_trips_through_dicom(tmp_path):
    """The project's own phantom (when its module is there): CT and CTV through DICOM and back."""
    phantom_module = pytest.importorskip("MMContourLib.data.phantom")
    if not hasattr(phantom_module, "generate_case"):
        pytest.skip("MMContourLib.data.phantom has no generate_case yet")
    case = phantom_module.generate_case(0)
    ctv = case.ctv if isinstance(case.ctv, sitk.Image) else sitk.GetImageFromArray(np.asarray(case.ctv))
    ctv.CopyInformation(case.ct)
    # keep it quick: the slab of slices around the CTV
    ks = np.flatnonzero(sitk.GetArrayViewFromImage(ctv).any(axis=(1, 2)))
    lo, hi = max(int(ks.min()) - 2, 0), min(int(ks.max()) + 3, ctv.GetSize()[2])
    size = list(ctv.GetSize()[:2]) + [hi - lo]
    ct = sitk.RegionOfInterest(case.ct, size, [0, 0, lo])
    ctv = sitk.RegionOfInterest(ctv, size, [0, 0, lo])
    hu = np.clip(sitk.GetArrayFromImage(ct), -1024, 3071).astype(np.int16)
    truth = sitk.GetArrayFromImage(ctv) > 0
    direction, origin = np.array(ct.GetDirection()).reshape(3, 3), np.array(ct.GetOrigin())
    if np.linalg.det(direction) < 0:  # DICOM stacks slices along row x column: store the slab the other way round
        origin = np.array(ct.TransformIndexToPhysicalPoint((0, 0, size[2] - 1)))
        direction[:, 2] *= -1
        hu, truth = hu[::-1].copy(), truth[::-1].copy()
    series = Series(tmp_path / "ct", hu, (direction[:, 0], direction[:, 1]), spacing=ct.GetSpacing(), origin=origin)
    image, info = read_ct_series(series.folder)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), direction.ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
    mask = sitk.GetImageFromArray(truth.astype(np.uint8))
    mask.CopyInformation(image)
    rts = write_rtstruct(mask, info, tmp_path / "rs.dcm")
    again = rtstruct_to_mask(rts, image, info)
    assert dice(sitk.GetArrayFromImage(again), truth) >= 0.98
