"""DICOM RT out: the RTSTRUCT and DICOM SEG the planning system receives (references, exact round trip,
``dciodvfy`` when installed), and one ROI / segment per structure with its name, colour and codes.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_phantoms import ORIENTATIONS, RTSTRUCT_STORAGE, Series, dciodvfy_errors, needs_dciodvfy, phantom
from MMContourLib.cli.predict import add_export_arguments
from MMContourLib.dicom import archive as dicom_import
from MMContourLib.dicom import export as dicomrt
from MMContourLib.dicom.archive import rtstruct_to_mask
from MMContourLib.dicom.export import write_dicom_seg, write_rtstruct
from MMContourLib.image.ctseries import EmptyContourError, read_ct_series


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
