"""import-dicom's structure map: a hospital's structure names -> our regions, the regions map it writes, its report."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk

from MMContourLib.cli import import_dicom as import_dicom_cli
from MMContourLib.dicom.structure_map import (DEFAULT_RULES, default_structure_map, read_structure_map,
                                              side_in_name)
from MMContourLib.note.targets import REGION_LABELS
from dicom_phantoms import Series, ellipse_contours, phantom, write_reference_rtstruct

#: The ROI names (StructureSetROISequence) of tests/testdata/example_data/rtss.dcm in the BSD-licensed
#: dicompyler-core 0.5.6 sdist: a real, anonymised left breast plan. The file itself is not committed.
DICOMPYLER_RTSS_NAMES = ["BODY", "Areola", "Borders", "Breast", "Heart", "Lt Lung", "Nodes", "Scar", "Tumor Bed",
                         "Tumor Bed Block"]


def check_dicompyler_names(names):
    verdicts = {v.name: v for v in default_structure_map().classify_all(names, ["left"])}
    assert verdicts["Breast"].status == "region" and verdicts["Breast"].region == "breast_left"
    # "Nodes" cannot be split into levels: in the union ctv, but no region of its own
    assert verdicts["Nodes"].status == "union" and verdicts["Nodes"].region == "nodes"
    assert {n for n, v in verdicts.items() if v.status == "excluded"} == set(names) - {"Breast", "Nodes"}
    assert "organ at risk" in verdicts["Lt Lung"].reason and "tumour bed" in verdicts["Tumor Bed Block"].reason


def test_a_real_exports_names_map():
    check_dicompyler_names(DICOMPYLER_RTSS_NAMES)


@pytest.mark.slow
def test_the_real_export_itself(tmp_path):
    """The same on the file as shipped, when PyPI can be reached."""
    pydicom = pytest.importorskip("pydicom")
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "dicompyler-core==0.5.6", "-d", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("cannot download dicompyler-core 0.5.6: PyPI did not answer within 120 s")
    if run.returncode != 0:
        pytest.skip(f"cannot download dicompyler-core 0.5.6 from PyPI: {run.stderr.strip().splitlines()[-1:]}")
    with tarfile.open(next(tmp_path.glob("dicompyler-core-0.5.6.tar.*"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tests/testdata/example_data/rtss.dcm"))
        ds = pydicom.dcmread(tar.extractfile(member))
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == DICOMPYLER_RTSS_NAMES
    check_dicompyler_names(names)


@pytest.mark.parametrize("name, side, region", [
    ("Breast", "left", "breast_left"), ("CTV_Breast_L", "right", "breast_left"), ("CTVp_Breast", "right", "breast_right"),
    ("Chestwall", "left", "chestwall_left"), ("CW", "right", "chestwall_right"), ("Axilla", "left", "axilla_left"),
    ("AxL1", "right", "axilla_l1_right"), ("CTV_L1 Lt", "right", "axilla_l1_left"), ("Level I-III", "left", "axilla_left"),
    ("Level II R", "left", "axilla_l2_right"), ("Level III", "left", "axilla_l3_left"), ("CTVn_L2_L", "right", "axilla_l2_left"),
    ("level i", "right", "axilla_l1_right"), ("Ax L1-2", "left", "axilla_left"), ("CTVn_L3_R", "left", "axilla_l3_right"),
    ("SCV", "left", "supraclavicular_left"), ("Supraclav", "right", "supraclavicular_right"),
    ("CTV_L4", "left", "supraclavicular_left"), ("IMN", "left", "internal_mammary_left"),
    ("IMC", "right", "internal_mammary_right"), ("CTVn_IMN_R", "left", "internal_mammary_right"),
    ("BreastLt", "right", "breast_left")])
def test_default_names_map_to_regions(name, side, region):
    """``side``: the clinical table's; a side in the name wins (the region is then on a side not treated)."""
    v = default_structure_map().classify(name, None if side_in_name(name) else [side])
    assert (v.status, v.region) == ("region", region)


@pytest.mark.parametrize("name", ["CTV", "CTV_total", "Nodes", "CTVn"])
def test_unions_are_union_only(name):
    assert default_structure_map().classify(name, ["left"]).status == "union"


@pytest.mark.parametrize("name", ["PTV", "PTV_Breast_L", "GTV", "Tumour bed", "CTV_Boost", "CTV_TB", "Heart",
                                  "Lung_L", "BODY", "Spinal cord", "Contralateral breast", "zCTV_old"])
def test_excluded_names(name):
    v = default_structure_map().classify(name, ["left"])
    assert v.status == "excluded" and v.reason


def test_side_rules():
    m = default_structure_map()
    assert side_in_name("CTV_L1") is None and side_in_name("CTV_L4 Rt") == "right" and side_in_name("L_R") is None
    # no side in the name and both sides treated: it cannot be a region
    assert m.classify("Breast", ["left", "right"]).status == "union"
    # a breast on the side not treated is a contralateral organ, not the target
    v = m.classify("Breast_R", ["left"])
    assert v.status == "ignored" and "contralateral" in v.reason


def test_written_defaults_read_back(tmp_path):
    for name in ("map.csv", "map.json"):
        with pytest.raises(SystemExit) as done:
            parser = argparse.ArgumentParser()
            import_dicom_cli.register(parser.add_subparsers())
            parser.parse_args(["import-dicom", "--write-map", str(tmp_path / name)])  # no --in / --out needed
        assert done.value.code == 0
        assert read_structure_map(tmp_path / name, defaults=False).rules == DEFAULT_RULES


def test_a_bad_map_file_names_the_problem(tmp_path):
    (tmp_path / "m.csv").write_text("pattern,region\nBreastish,breastbone\n")
    with pytest.raises(ValueError, match="breastbone"):
        read_structure_map(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("name,target\nX,breast\n")
    with pytest.raises(ValueError, match="pattern,region"):
        read_structure_map(tmp_path / "n.csv")


# -- the import ---------------------------------------------------------------------------------------------
SHAPE = (8, 32, 32)
# centres (mm in a 48 x 40 x 20 mm grid) of small ellipsoids that do not touch
BREAST, LEVEL1, IMN, OTHER = (10, 12, 8), (36, 12, 8), (10, 30, 8), (36, 30, 8)
SMALL = (6.0, 5.0, 5.0)
PARTS = {"CTV_Breast_L": BREAST, "CTV_L1 Lt": LEVEL1, "IMN_L": IMN}


def export(root, pid, structures):
    """A CT and an RTSTRUCT whose ``structures`` ({name: centre}) are small disjoint ellipsoids."""
    hu, _ = phantom(shape=SHAPE, centre=(24, 20, 8), radii=(10, 8, 7))
    s = Series(root / pid / "CT", hu, patient_id=pid)
    write_reference_rtstruct(root / pid / "RS.dcm", s, {
        name: ellipse_contours(s, centre=np.array(c, float), radii=np.array(r, float), slices=range(SHAPE[0]))
        for name, (c, r) in structures.items()})


def clinical_table(path, *pids):
    fields = ["patient_id", "side", "n_stage", "surgery"]
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([fields] + [[p, "left", "N1", "bcs"] for p in pids])
    return path


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    import_dicom_cli.register(parser.add_subparsers())
    args = parser.parse_args(["import-dicom", *argv])
    summary = args.func(args)
    return summary, capsys.readouterr().out


def test_separate_structures_give_a_regions_map_and_a_report(tmp_path, capsys):
    root = tmp_path / "export"
    export(root, "P1", {**{n: (c, SMALL) for n, c in PARTS.items()}, "PTV": (BREAST, (9.0, 8.0, 7.0)),
                        "Xyz_helper": (OTHER, SMALL)})
    export(root, "P2", {"Breast": (BREAST, SMALL), "Nodes": (LEVEL1, SMALL)})
    out = tmp_path / "dataset"
    summary, printed = run_cli(["--in", str(root), "--clinical", str(clinical_table(tmp_path / "c.csv", "P1", "P2")),
                                "--out", str(out)], capsys)
    assert summary["imported"] == 2 and summary["regions_maps"] == 1
    assert summary["unrecognised_structures"] == {"Xyz_helper": 1}

    manifest = {r["case_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    regions = sitk.GetArrayFromImage(sitk.ReadImage(str(out / manifest["P1"]["regions"])))
    ctv = sitk.GetArrayFromImage(sitk.ReadImage(str(out / manifest["P1"]["ctv"])))
    assert set(np.unique(regions)) == {0, REGION_LABELS["breast_left"], REGION_LABELS["axilla_l1_left"],
                                       REGION_LABELS["internal_mammary_left"]}
    np.testing.assert_array_equal(regions > 0, ctv > 0)  # the PTV and the unknown name are in neither
    # "Nodes" cannot be split into levels: P2 has the union ctv only
    assert manifest["P2"]["regions"] == ""
    p2_ctv = sitk.GetArrayFromImage(sitk.ReadImage(str(out / manifest["P2"]["ctv"])))
    assert p2_ctv[:, :, :12].any() and p2_ctv[:, :, 18:].any()  # both structures (i = u / 1.5 mm)

    cases = {c["case_id"]: c["structure_map"] for c in json.loads((out / "import_report.json").read_text())["cases"]}
    assert cases["P1"]["mapped"] == {"CTV_Breast_L": "breast_left", "CTV_L1 Lt": "axilla_l1_left",
                                     "IMN_L": "internal_mammary_left"}
    assert "planning target volume" in cases["P1"]["ignored"]["PTV"]
    assert cases["P1"]["unrecognised"] == ["Xyz_helper"] and cases["P1"]["regions_map"]
    assert list(cases["P2"]["union_only"]) == ["Nodes"] and not cases["P2"]["regions_map"]
    assert "Nodes (union only)" in cases["P2"]["regions_note"]
    assert "IMN_L -> internal_mammary_left" in printed and "NOT RECOGNISED: Xyz_helper" in printed
    assert "PTV (planning target volume" in printed and "[no regions map: Nodes (union only)" in printed


def test_the_users_map_overrides_a_default(tmp_path, capsys):
    root = tmp_path / "export"
    export(root, "P1", {"Breast": (BREAST, SMALL), "Nodes": (LEVEL1, SMALL)})
    table = clinical_table(tmp_path / "c.csv", "P1")
    (tmp_path / "map.csv").write_text("pattern,region,side\n# this clinic's 'Nodes' is the axilla only\n"
                                      "nodes,axilla,\n")
    out = tmp_path / "dataset"
    summary, _ = run_cli(["--in", str(root), "--clinical", str(table), "--out", str(out),
                          "--structure-map", str(tmp_path / "map.csv"), "--json"], capsys)
    assert summary["regions_maps"] == 1
    report = json.loads((out / "import_report.json").read_text())
    assert report["structure_map"] == str(tmp_path / "map.csv")
    assert report["cases"][0]["structure_map"]["mapped"] == {"Breast": "breast_left", "Nodes": "axilla_left"}


def test_pattern_still_selects_the_ctv_by_name(tmp_path, capsys):
    root = tmp_path / "export"
    export(root, "P1", {"Breast": (BREAST, SMALL), "Nodes": (LEVEL1, SMALL)})
    out = tmp_path / "dataset"
    run_cli(["--in", str(root), "--clinical", str(clinical_table(tmp_path / "c.csv", "P1")), "--out", str(out),
             "--pattern", "breast", "--json"], capsys)
    ctv = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cases" / "P1" / "ctv.nii.gz")))
    assert ctv[:, :, :12].any() and not ctv[:, :, 18:].any()
    mapping = json.loads((out / "import_report.json").read_text())["cases"][0]["structure_map"]
    assert mapping["mapped"] == {"Breast": "breast_left"} and "--pattern" in mapping["ignored"]["Nodes"]
