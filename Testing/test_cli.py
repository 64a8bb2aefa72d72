"""The mmcontour command end to end on files, and its refusals (clear message, nothing written)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib.cli.main import main
from MMContourLib.image.readwrite import read_segmentation


@pytest.fixture()
def ct_file(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(size=(48, 40, 24)), str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_writes_slicer_segmentation_on_ct_grid(tiny_bundle, ct_file, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    code, stdout, err = run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle", tiny_bundle,
                            "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["prompt"] == "N1, breast conserving surgery, left side" and summary["llm_calls"] == 1
    assert set(summary["timings_s"]) >= {"preprocess", "encode_note", "windows", "postprocess", "total"}
    segs = read_segmentation(out)
    assert list(segs) == ["CTV"]
    ct = sitk.ReadImage(str(ct_file))
    mask = segs["CTV"]
    assert mask.GetSize() == ct.GetSize() and np.allclose(mask.GetOrigin(), ct.GetOrigin())
    assert int(sitk.GetArrayFromImage(mask).sum()) == summary["voxels"]
    header = sitk.ReadImage(str(out))
    assert "DCM^130041^RT Target~SCT^228792002^" in header.GetMetaData("Segment0_Tags")  # RT target: CTV
    assert header.GetMetaData("MMContour_prompt") == summary["prompt"]


def test_predict_structured_fields_and_nifti_labelmap(tiny_bundle, ct_file, tmp_path, capsys):
    out = tmp_path / "ctv.nii.gz"
    code, _, err = run(capsys, "predict", "--ct", ct_file, "--side", "right", "--n", "ypN2", "--surgery", "MRM",
                       "--chemotherapy", "neoadjuvant", "--bundle", tiny_bundle, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == (48, 40, 24)


def test_speed_and_memory_flags_keep_the_contour(tiny_bundle, ct_file, tmp_path, capsys):
    """--precision / --channels-last / --cache-features / --offload-llm change how, not what; --dtype int8
    (8-bit LLM) changes the note embedding only by quantisation noise."""
    def contour(name, *flags):
        out = tmp_path / f"{name}.nii.gz"
        code, stdout, err = run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle", tiny_bundle,
                                "--out", out, "--device", "cpu", "--json", *flags)
        assert code == 0, err
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(bool), json.loads(stdout)

    plain, _ = contour("plain")
    assert 0 < plain.sum() < plain.size  # a real contour, so equality below means something
    tuned, summary = contour("tuned", "--precision", "fp32", "--channels-last", "--cache-features", "off",
                             "--offload-llm")
    assert np.array_equal(plain, tuned) and summary["llm_calls"] == 1
    eight, _ = contour("int8", "--dtype", "int8")
    dice = 2 * (plain & eight).sum() / (plain.sum() + eight.sum())
    assert dice > 0.97, dice
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle", tiny_bundle,
            "--out", tmp_path / "x.nii.gz", "--precision", "fp8")
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("args,message", [
    (["--note", "N7, BCS, left"], "n_stage"),
    (["--note", "ypN1, BCS, left, adjuvant"], "neoadjuvant"),
    (["--side", "left"], "n_stage"),
])
def test_bad_notes_fail_before_loading_and_write_nothing(tiny_bundle, ct_file, tmp_path, capsys, args, message):
    out = tmp_path / "x.seg.nrrd"
    code, _, err = run(capsys, "predict", "--ct", ct_file, *args, "--bundle", tiny_bundle, "--out", out)
    assert code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [ct_file]


def test_bad_images_and_bundles_write_nothing(tiny_bundle, ct_file, tmp_path, capsys):
    mr = tmp_path / "mr.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1, (24, 40, 48)).astype(np.float32)),
                    str(mr))
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([40, 40], sitk.sitkInt16), str(flat))
    for ct, message in ((mr, "Hounsfield"), (flat, "3D"), (tmp_path / "missing.nii.gz", "not found")):
        out = tmp_path / "o.seg.nrrd"
        code, _, err = run(capsys, "predict", "--ct", ct, "--note", "N0, BCS, left", "--bundle", tiny_bundle,
                           "--out", out, "--device", "cpu")
        assert code == 2 and message in err, err
        assert not out.exists()
    # a CT that can be contoured: a bad one is refused before the bundle is looked at (test_bad_inputs)
    code, _, err = run(capsys, "predict", "--ct", ct_file, "--note", "N0, BCS, left", "--bundle", tmp_path / "nobundle",
                       "--out", tmp_path / "o.seg.nrrd")
    assert code == 2 and "bundle" in err
    assert not any(p.name.startswith((".o", "o.")) for p in tmp_path.iterdir())


def test_existing_output_is_never_overwritten_without_asking(tiny_bundle, ct_file, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    out.write_text("the user's own file")
    code, _, err = run(capsys, "predict", "--ct", ct_file, "--note", "N0, BCS, left", "--bundle", tiny_bundle,
                       "--out", out, "--device", "cpu")
    assert code == 2 and "--overwrite" in err and out.read_text() == "the user's own file"
    code, _, err = run(capsys, "predict", "--ct", ct_file, "--note", "N0, BCS, left", "--bundle", tiny_bundle,
                       "--out", out, "--device", "cpu", "--overwrite")
    assert code == 0 and "CTV" in read_segmentation(out)


def test_predict_from_dicom_series_writes_rtstruct_and_dicom_seg(tiny_bundle, tmp_path, capsys):
    import pydicom
    from dicom_phantoms import Series, phantom

    hu, _ = phantom(shape=(30, 80, 80))
    series = Series(tmp_path / "ct", hu)
    seg, rs, dseg = tmp_path / "ctv.seg.nrrd", tmp_path / "RS.dcm", tmp_path / "SEG.dcm"
    code, stdout, err = run(capsys, "predict", "--ct", series.folder, "--note", "N2, total mastectomy, Rt",
                            "--bundle", tiny_bundle, "--out", seg, "--out-rtstruct", rs, "--out-dicom-seg", dseg,
                            "--device", "cpu", "--json")
    assert code == 0, err
    ds = pydicom.dcmread(rs)
    assert ds.Modality == "RTSTRUCT" and ds.PatientID == "P001"
    assert ds.StructureSetROISequence[0].ROIName == "CTV_R"
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == series.series_uid
    assert pydicom.dcmread(dseg).Modality == "SEG"


def test_command_modules_import_neither_torch_nor_monai():
    """Every module under cli/ registers its subcommand with light imports; the heavy ones wait for the run."""
    import pkgutil
    import subprocess
    import sys

    import MMContourLib.cli

    names = [m.name for m in pkgutil.iter_modules(MMContourLib.cli.__path__) if m.name != "__main__"]
    assert {"main", "common", "predict", "phantom", "train", "evaluate", "demo", "import_dicom", "bench"} <= set(names)
    code = ("import importlib, sys\nfor name in %r:\n    importlib.import_module('MMContourLib.cli.' + name)\n"
            "print(sorted(m for m in ('torch', 'monai', 'transformers', 'pydicom', 'matplotlib') if m in sys.modules))"
            % (names,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out[-500:]


def test_help_needs_neither_torch_nor_monai():
    """`mmcontour --help` and each subcommand's --help import only what they show (start-up time)."""
    import subprocess
    import sys

    from MMContourLib.cli.main import build_parser

    parser = build_parser()
    commands = tuple(next(a for a in parser._actions if a.dest == "command").choices)  # every subcommand
    assert {"predict", "train", "evaluate", "calibrate-review", "import-dicom"} <= set(commands)
    for argv in (["--help"], *([c, "--help"] for c in commands)):
        code = ("import sys\nfrom MMContourLib.cli.main import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'monai', 'transformers', 'pydicom', 'matplotlib') if m in sys.modules))"
                % (argv,))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == "[]", (argv, out[-500:])


def test_subcommands_parse_into_their_run_function(tmp_path):
    from MMContourLib.cli import import_dicom, phantom
    from MMContourLib.cli.main import build_parser

    args = build_parser().parse_args(["phantom", "--n", "2", "--out", str(tmp_path)])
    assert args.command == "phantom" and args.n == 2 and args.func is phantom.run
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices["import-dicom"].parse_args(["--in", "a", "--clinical", "b", "--out", "c"]).json is False
    assert parser.parse_args(["import-dicom", "--in", "a", "--clinical", "b", "--out", "c"]).func is import_dicom.run


# -- per-structure output: --structures both | regions | union --------------------------------------------
def test_structure_modes_agree_with_the_contourer():
    from MMContourLib.cli.predict import STRUCTURE_MODES
    from MMContourLib.inference.contourer import SEGMENT_MODES

    assert STRUCTURE_MODES == SEGMENT_MODES


def test_predict_writes_one_segment_per_structure_in_every_mode(tiny_structure_bundle, ct_file, tmp_path, capsys):
    from MMContourLib.note.structures import STRUCTURES, SIDE_MODIFIER, structure_classes, structure_for

    def predict(mode, name, *extra):
        out = tmp_path / name
        code, stdout, err = run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle",
                                tiny_structure_bundle, "--out", out, "--device", "cpu", "--structures", mode, *extra)
        assert code == 0, err
        return out, stdout

    out, stdout = predict("both", "both.seg.nrrd", "--json")
    summary = json.loads(stdout)
    assert summary["structures_mode"] == "both"
    assert [s["name"] for s in summary["structures"]] == list(structure_classes())  # every class, drawn or not
    drawn = [s["name"] for s in summary["structures"] if s["volume_cc"] > 0]
    assert summary["voxels"] > 0 and drawn  # the random model draws something, so the checks below bite
    expected = {s["name"] for s in summary["structures"] if s["expected"]}
    assert {"CTVp_Breast_L", "CTVn_L1_L"} <= expected and not any(n.endswith("_R") for n in expected)
    segs = read_segmentation(out)
    assert list(segs) == ["CTV", *drawn] == summary["segments"]
    ct = sitk.ReadImage(str(ct_file))
    voxel_cc = float(np.prod(ct.GetSpacing())) / 1000
    arrays = {n: sitk.GetArrayFromImage(m).astype(bool) for n, m in segs.items()}
    for s in summary["structures"]:
        if s["name"] in arrays:
            assert abs(arrays[s["name"]].sum() * voxel_cc - s["volume_cc"]) <= 0.01, s
    union = np.logical_or.reduce([arrays[n] for n in drawn])
    np.testing.assert_array_equal(union, arrays["CTV"])  # the structures tile the CTV, without overlap
    assert sum(arrays[n].sum() for n in drawn) == arrays["CTV"].sum() == summary["voxels"]
    header = sitk.ReadImage(str(out))
    for i, name in enumerate(segs):
        row, side = structure_for(name)
        assert np.allclose([float(c) for c in header.GetMetaData(f"Segment{i}_Color").split()], row.color)
        tags = header.GetMetaData(f"Segment{i}_Tags")
        assert f"~{row.region}~{SIDE_MODIFIER[side or 'left']}" in tags, (name, tags)
    assert header.GetMetaData("MMContour_structures") == "both"
    assert STRUCTURES["CTV"].color != STRUCTURES["CTVn_L1"].color  # the colours checked are distinct

    out, _ = predict("regions", "regions.seg.nrrd", "--json")
    assert list(read_segmentation(out)) == drawn  # no CTV segment
    out, _ = predict("union", "union.seg.nrrd", "--json")
    assert list(read_segmentation(out)) == ["CTV"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_segmentation(out)["CTV"]).astype(bool),
                                  arrays["CTV"])

    # a labelmap: one label per voxel, 1 + the structure's class index; the CTV is every labelled voxel
    out, stdout = predict("both", "labels.nrrd")
    labels = sitk.ReadImage(str(out))
    values = sitk.GetArrayFromImage(labels)
    classes = structure_classes()
    assert sorted(np.unique(values[values > 0]).tolist()) == sorted(1 + classes.index(n) for n in drawn)
    for name in drawn:
        assert labels.GetMetaData(f"MMContour_label{1 + classes.index(name)}") == name
        np.testing.assert_array_equal(values == 1 + classes.index(name), arrays[name])
    # the text summary: one line per structure drawn or called for, with its volume in cc
    lines = stdout.splitlines()
    for s in summary["structures"]:
        if s["volume_cc"] > 0 or s["expected"]:
            assert any(line.strip().startswith(f"{s['name']}: {s['volume_cc']:.1f} cc") for line in lines), s
    assert f"labels in {out.name}: " in stdout


def test_a_single_ctv_bundle_writes_its_ctv_in_every_mode(tiny_bundle, ct_file, tmp_path, capsys):
    for mode in ("both", "regions", "union"):
        out = tmp_path / f"{mode}.seg.nrrd"
        code, stdout, err = run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle", tiny_bundle,
                                "--out", out, "--device", "cpu", "--structures", mode, "--json")
        assert code == 0, err
        summary = json.loads(stdout)
        assert list(read_segmentation(out)) == ["CTV"] and summary["segments"] == ["CTV"]
        assert summary["structures"] == [] and summary["structures_mode"] == mode
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser, before any model loads
        run(capsys, "predict", "--ct", ct_file, "--note", "N1, BCS, Lt", "--bundle", tiny_bundle,
            "--out", tmp_path / "x.seg.nrrd", "--structures", "lobes")
    assert exit_info.value.code == 2 and "--structures" in capsys.readouterr().err
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_predict_from_dicom_writes_one_roi_and_segment_per_structure(tiny_structure_bundle, tmp_path, capsys):
    import pydicom
    from dicom_phantoms import Series, phantom

    from MMContourLib.note.structures import structure_for

    series = Series(tmp_path / "ct", phantom(shape=(30, 80, 80))[0])
    seg, rs, dseg = tmp_path / "ctv.seg.nrrd", tmp_path / "RS.dcm", tmp_path / "SEG.dcm"
    code, stdout, err = run(capsys, "predict", "--ct", series.folder, "--note", "N2, total mastectomy, Rt",
                            "--bundle", tiny_structure_bundle, "--out", seg, "--out-rtstruct", rs,
                            "--out-dicom-seg", dseg, "--roi-color", "0,0,255", "--device", "cpu", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    drawn = [s["name"] for s in summary["structures"] if s["volume_cc"] > 0]
    assert summary["segments"] == ["CTV", *drawn] and drawn
    names = ["CTV_R", *drawn]  # --roi-name names the whole CTV; the structures keep their table names
    ds = pydicom.dcmread(rs)
    assert [r.ROIName for r in ds.StructureSetROISequence] == names
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [0, 0, 255]
    for name, item in zip(drawn, ds.ROIContourSequence[1:]):
        assert list(item.ROIDisplayColor) == [round(255 * c) for c in structure_for(name)[0].color]
        assert len(item.ContourSequence) > 0
    segments = pydicom.dcmread(dseg).SegmentSequence
    assert [s.SegmentLabel for s in segments] == names
    assert [s.AnatomicRegionSequence[0].CodeValue for s in segments] == \
        [structure_for(n)[0].region.value for n in names]
