"""DICOM RT in: CT series and RTSTRUCTs read on every orientation, broken inputs refused, ``import-dicom``
building a manifest, and the project's phantom through DICOM and back. The DICOM objects are built by hand
(``dicom_phantoms``), independent of the code under test.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_phantoms import (CTV_CENTRE, CTV_RADII, ORIENTATIONS, ROT, SPACING, Series, dice, ellipse_contours, phantom,
                            write_reference_rtstruct)
from MMContourLib.cli import import_dicom as import_dicom_cli
from MMContourLib.dicom import archive as dicom_import
from MMContourLib.dicom.archive import rtstruct_to_mask
from MMContourLib.dicom.export import write_rtstruct
from MMContourLib.image import ctseries
from MMContourLib.image.ctseries import (DicomError, DicomGeometryError, EmptyContourError, NotCTError,
                                         WrongSeriesError, read_ct_series)


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
