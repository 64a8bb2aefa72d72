"""``mmcontour read-note`` and the free text it reads for ``predict`` (``--note-file``, a manifest's ``note``
column): the JSON shape, the exit codes, and that an undecided or conflicting field stops a run (never a guess)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib.cli.main import main

REPORT = "S/p left partial mastectomy and SLNB. pT1c, 1/3 SLN positive. 61 yo."
NO_SIDE = "Breast cancer s/p lumpectomy and SLNB; 0/2 sentinel nodes."


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def ct_file(tmp_path) -> Path:
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_ct(), str(path))
    return path


def note_file(tmp_path, text, name="note.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_note_json_is_the_reading(capsys):
    code, out, _ = run(capsys, "read-note", "--text", REPORT, "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"prompt", "fields", "evidence", "unresolved", "conflicts"}
    assert data["prompt"] == "N1, breast conserving surgery, left side"
    assert data["fields"]["side"] == "left" and data["fields"]["n_stage"] == "N1" and data["fields"]["age"] == "61"
    side = data["evidence"]["side"][0]
    assert set(side) == {"start", "end", "text", "rule"} and REPORT[side["start"]:side["end"]] == side["text"]
    assert data["unresolved"] == [] and data["conflicts"] == []


def test_read_note_exit_code_says_whether_the_note_is_complete(tmp_path, capsys):
    code, out, _ = run(capsys, "read-note", "--file", note_file(tmp_path, NO_SIDE), "--json")
    data = json.loads(out)
    assert code == 2 and "side" in data["unresolved"] and data["prompt"] is None
    code, out, _ = run(capsys, "read-note", "--text", NO_SIDE)
    assert code == 2 and "undecided: side" in out and "lumpectomy" in out
    code, out, _ = run(capsys, "read-note", "--text", REPORT)
    assert code == 0 and "prompt: N1, breast conserving surgery, left side" in out
    assert "'1/3' (node count)" in out  # the span and the rule per field
    code, _, err = run(capsys, "read-note", "--file", tmp_path / "missing.txt")
    assert code == 2 and "missing.txt" in err


def predict(capsys, ct, out, bundle, *extra):
    return run(capsys, "predict", "--ct", ct, "--bundle", bundle, "--out", out, "--device", "cpu", *extra)


def test_predict_note_file_reads_free_text(ct_file, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    code, stdout, err = predict(capsys, ct_file, out, tiny_bundle, "--note-file", note_file(tmp_path, REPORT), "--json")
    assert code == 0, err
    assert json.loads(stdout)["prompt"] == "N1, breast conserving surgery, left side" and out.exists()
    out2 = tmp_path / "ctv2.seg.nrrd"  # a flag may state what the text leaves undecided
    code, stdout, err = predict(capsys, ct_file, out2, tiny_bundle, "--note-file", note_file(tmp_path, NO_SIDE),
                                "--side", "right", "--json")
    assert code == 0, err
    assert json.loads(stdout)["prompt"] == "N0, breast conserving surgery, right side"


def test_predict_note_file_never_guesses(ct_file, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    nobundle = tmp_path / "no-bundle-here"  # refused before any model is looked for
    code, _, err = predict(capsys, ct_file, out, nobundle, "--note-file", note_file(tmp_path, NO_SIDE))
    assert code == 2 and "side" in err and "state or correct" in err and not out.exists()
    code, _, err = predict(capsys, ct_file, out, nobundle, "--note-file", note_file(tmp_path, REPORT),
                           "--side", "right")
    assert code == 2 and "'left'" in err and "'right'" in err and "--side" in err and not out.exists()
    code, _, err = predict(capsys, ct_file, out, nobundle, "--note-file", note_file(tmp_path, REPORT),
                           "--note", "N1, BCS, left")
    assert code == 2 and "--note-file" in err and "not both" in err


def test_a_manifest_note_column_may_hold_free_text(ct_file, tiny_bundle, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "ct", "note"])
        writer.writeheader()
        writer.writerow({"case_id": "report", "ct": ct_file.name, "note": REPORT})
        writer.writerow({"case_id": "noside", "ct": ct_file.name, "note": NO_SIDE})
        writer.writerow({"case_id": "table5", "ct": ct_file.name, "note": "N2, MRM, right"})
    out = tmp_path / "out"
    code, _, _ = run(capsys, "predict", "--manifest", manifest, "--out", out, "--bundle", tiny_bundle,
                     "--device", "cpu", "--json")
    cases = {c["case_id"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert code == 1 and cases["noside"]["status"] == "failed"
    assert "side" in cases["noside"]["error"] and not (out / "noside.seg.nrrd").exists()
    assert cases["report"]["status"] == "ok" and cases["report"]["prompt"] == "N1, breast conserving surgery, left side"
    assert cases["table5"]["prompt"] == "N2, total mastectomy surgery, right side"
