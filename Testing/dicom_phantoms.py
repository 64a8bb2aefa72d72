"""DICOM phantoms written here with pydicom, independent of the code under test (test_dicomrt, test_dicom_export).

The CT series and the reference RTSTRUCTs are built by hand: analytic ellipse contours of an ellipsoid CTV,
several orientations, gantry-tilt metadata, broken series. ``dciodvfy`` (Debian's dicom3tools) checks
exported objects when it is installed.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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
