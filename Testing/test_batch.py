"""Archive-scale predict: ``mmcontour predict --manifest CSV --out DIR`` (one bad case, sharding)."""
import csv
import json

import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib.cli import main as cli
from MMContourLib.data.manifest import ManifestError, read_manifest

FIELDS = ["case_id", "ct", "side", "n_stage", "surgery", "note"]


def write_manifest(folder, rows):
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in FIELDS})
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    (folder / "cts").mkdir()
    for i in range(3):
        sitk.WriteImage(make_ct(size=(48, 40, 24), seed=i), str(folder / "cts" / f"ct{i}.nrrd"))
    rows = [
        {"case_id": "c0", "ct": "cts/ct0.nrrd", "side": "left", "n_stage": "N1", "surgery": "bcs"},
        {"case_id": "c1", "ct": "cts/missing.nrrd", "side": "right", "n_stage": "N0", "surgery": "bcs"},
        {"case_id": "c2", "ct": "cts/ct1.nrrd", "note": "N2, total mastectomy surgery, right side"},
        {"case_id": "c3", "ct": "cts/ct2.nrrd", "side": "sideways", "n_stage": "N0", "surgery": "bcs"},
        {"case_id": "c4", "ct": "cts/ct2.nrrd", "side": "both", "n_stage": "left:N0;right:N1", "surgery": "bcs"},
    ]
    return write_manifest(folder, rows)


def run(manifest, out, bundle, *extra):
    return cli.main(["predict", "--manifest", str(manifest), "--out", str(out), "--bundle", str(bundle),
                     "--device", "cpu", "--json", *extra])


def test_failing_cases_are_reported_and_the_rest_go_on(archive, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(archive, out, tiny_bundle) == 1  # non-zero: some cases failed
    summary = json.loads((out / "summary.json").read_text())
    status = {c["case_id"]: c["status"] for c in summary["cases"]}
    assert status == {"c0": "ok", "c1": "failed", "c2": "ok", "c3": "failed", "c4": "ok"}
    assert summary["ok"] == 3 and summary["failed"] == 2 and summary["llm_calls"] == 3
    errors = {c["case_id"]: c["error"] for c in summary["cases"]}
    assert "read CT" in errors["c1"] and "missing.nrrd" in errors["c1"]
    assert "note" in errors["c3"] and "sideways" in errors["c3"]
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == ["c0.seg.nrrd", "c2.seg.nrrd", "c4.seg.nrrd"]
    ok = next(c for c in summary["cases"] if c["case_id"] == "c2")
    assert ok["volume_cc"] >= 0 and ok["timings_s"]["windows"] > 0 and ok["prompt"].startswith("N2")
    seg = sitk.ReadImage(str(out / "c2.seg.nrrd"))
    assert seg.GetMetaData("MMContour_case_id") == "c2"
    assert "c1 failed" in capsys.readouterr().err

    before = (out / "c0.seg.nrrd").stat().st_mtime_ns
    assert run(archive, out, tiny_bundle) == 1
    again = json.loads((out / "summary.json").read_text())
    assert {c["case_id"]: c["status"] for c in again["cases"]}["c0"] == "skipped"  # never overwritten silently
    assert (out / "c0.seg.nrrd").stat().st_mtime_ns == before
    run(archive, out, tiny_bundle, "--overwrite")
    assert (out / "c0.seg.nrrd").stat().st_mtime_ns != before


def test_torchrun_shards_cover_every_case_once(archive, tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-run")
    parts = []
    for rank in (1, 0):  # in either order, the last to finish merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        run(archive, out, tiny_bundle)
        parts.append(json.loads((out / f"summary.rank{rank}.json").read_text()))
    assert [c["case_id"] for c in parts[0]["cases"]] == ["c1", "c3"]
    assert [c["case_id"] for c in parts[1]["cases"]] == ["c0", "c2", "c4"]
    merged = json.loads((out / "summary.json").read_text())
    assert [c["case_id"] for c in merged["cases"]] == ["c0", "c1", "c2", "c3", "c4"]
    assert merged["world_size"] == 2 and merged["ok"] == 3 and merged["failed"] == 2
    assert merged["cases_total"] == 5


def test_stale_parts_of_an_earlier_run_are_not_merged(archive, tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "stale"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "old")
    run(archive, out, tiny_bundle)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "new")
    monkeypatch.setenv("RANK", "0")
    run(archive, out, tiny_bundle)
    assert not (out / "summary.json").exists()


def test_manifest_problems_are_clear(tmp_path, tiny_bundle, capsys):
    bad = write_manifest(tmp_path, [{"case_id": "a/b", "ct": "x.nrrd"}])
    with pytest.raises(ManifestError, match="case_id"):
        read_manifest(bad)
    dup = write_manifest(tmp_path, [{"case_id": "a", "ct": "x"}, {"case_id": "a", "ct": "y"}])
    with pytest.raises(ManifestError, match="lines 2 and 3"):
        read_manifest(dup)
    assert run(dup, tmp_path / "o", tiny_bundle) == 2
    assert "appears on lines" in capsys.readouterr().err
    assert run(dup, tmp_path / "o", tiny_bundle, "--note", "N0, bcs, left") == 2
    assert "comes from its row" in capsys.readouterr().err


# -- the plain-argument engine (also behind Resources/scripts/mmcontour_batch.py) -------------------

def _FakeResult(image, note):
    """A real ContourResult without a model: the whole CT is the CTV (a one-CTV bundle's result)."""
    from MMContourLib.inference.contourer import ContourResult

    mask = sitk.Cast(sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1, sitk.sitkUInt8)
    mask.CopyInformation(image)
    return ContourResult(mask, sitk.Cast(mask, sitk.sitkFloat32), note, note.to_prompt(),
                         {"prompt": note.to_prompt()}, timings={"total": 0.0}, windows=1)


class _FakeContourer:
    """Stands in for Contourer: no model, and the case named ``interrupt_at`` raises KeyboardInterrupt."""
    device, llm_calls, cache_features = "cpu", 0, "auto"

    def __init__(self, interrupt_at=None):
        self.interrupt_at, self.calls = interrupt_at, 0

    def provenance(self, prompt):
        return {"bundle_id": "fake", "prompt": prompt}

    def contour(self, image, note):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return _FakeResult(image, note)


def test_checked_manifest_fails_as_a_whole_and_selects_a_split(archive, tmp_path):
    from MMContourLib.data.manifest import read_manifest

    with pytest.raises(ManifestError, match=r"line 3 \(case c1\): ct not found"):
        read_manifest(archive, check=True)
    with pytest.raises(ManifestError, match="no 'split' column"):
        read_manifest(archive, split="test")
    rows = read_manifest(archive)  # unchecked: bad rows become failed cases later
    assert [r["case_id"] for r in rows] == ["c0", "c1", "c2", "c3", "c4"]
    split = tmp_path / "split.csv"
    split.write_text("case_id,ct,ctv,split,side,n_stage,surgery\n"
                     f"a,{archive.parent / 'cts' / 'ct0.nrrd'},cts/ct0.nrrd,test,left,N1,bcs\n"
                     "b,missing.nrrd,,train,sideways,N1,bcs\n")
    with pytest.raises(ManifestError, match="line 2 .*ctv not found"):
        read_manifest(split, split="test", check=True)  # ctv resolved against the CSV's folder
    (tmp_path / "cts").mkdir()
    sitk.WriteImage(make_ct(size=(8, 8, 4)), str(tmp_path / "cts" / "ct0.nrrd"))
    assert [r["case_id"] for r in read_manifest(split, split="test", check=True)] == ["a"]  # b not looked at
    with pytest.raises(ManifestError, match="line 3 .*side"):
        read_manifest(split, split="train", check=True)
    with pytest.raises(ManifestError, match="no case with split 'val'"):
        read_manifest(split, split="val", check=True)
    no_note = tmp_path / "no_note.csv"
    no_note.write_text("case_id,ct\na,x.nrrd\n")
    with pytest.raises(ManifestError, match="side, n_stage, surgery"):
        read_manifest(no_note, check=True)


def test_engine_scores_stops_on_error_and_keeps_progress_when_interrupted(archive, tmp_path):
    from MMContourLib.data.manifest import read_manifest
    from MMContourLib.inference.batch import contour_manifest, pending

    rows = read_manifest(archive)
    rows[0]["ctv"] = rows[0]["ct"]
    loads = []
    report = contour_manifest(rows, tmp_path / "a", lambda: loads.append(1) or _FakeContourer(), score=True,
                              stop_on_error=True, info={"manifest": "m"}, summary_view=lambda r: {"view": r["status"]})
    assert [c["case_id"] for c in report["cases"]] == ["c0", "c1"]  # stopped at the first failure
    assert report["status"] == "failed" and report["failed_cases"] == ["c1"] and report["manifest"] == "m"
    assert report["cases"][0]["dice"] == pytest.approx(
        2 * sitk.GetArrayViewFromImage(sitk.ReadImage(rows[0]["ct"]) > 0).sum()
        / (sitk.GetArrayViewFromImage(sitk.ReadImage(rows[0]["ct"]) > 0).sum() + 48 * 40 * 24), abs=1e-4)
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == {"view": "failed"}
    assert loads == [1]

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        contour_manifest(rows, out, lambda: _FakeContourer(interrupt_at=2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and [c["case_id"] for c in summary["cases"]] == ["c0", "c1"]
    assert [r["case_id"] for r in pending(rows, out)] == ["c1", "c2", "c3", "c4"]

    done = tmp_path / "c"
    contour_manifest(rows[:1], done, _FakeContourer)
    again = contour_manifest(rows[:1], done, lambda: pytest.fail("nothing to do: the model must not be loaded"))
    assert again["skipped"] == 1 and again["device"] is None and again["llm_calls"] == 0


def test_one_light_dice_for_demo_and_batch(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from MMContourLib.inference import demo
    from MMContourLib.image.metrics import dice

    assert demo.dice is dice
    a = np.zeros((4, 5, 6), np.uint8)
    b = np.zeros_like(a)
    assert dice(a, b) == 1.0  # both empty
    a[:2], b[1:3] = 1, 7  # anything > 0 is inside
    assert dice(a, b) == pytest.approx(2 * 30 / (60 + 60))
    image = sitk.GetImageFromArray(a)
    assert dice(image, sitk.GetImageFromArray(b)) == dice(a, b) == dice(image, b)
    moved = sitk.GetImageFromArray(b)
    moved.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="different grids"):
        dice(image, moved)
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:1])
    probe = ("import sys, MMContourLib.image.metrics, MMContourLib.inference.batch; "
             "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_one_grid_rule_relative_to_the_voxel_size():
    from MMContourLib.image.grid import check_same_grid, same_grid

    ct = make_ct(size=(40, 30, 10))
    nudged, moved = sitk.Image(ct), sitk.Image(ct)
    spacing = min(ct.GetSpacing())
    nudged.SetOrigin([o + 0.005 * spacing for o in ct.GetOrigin()])  # rounding in a file header
    moved.SetOrigin([o + 0.05 * spacing for o in ct.GetOrigin()])
    assert same_grid(nudged, ct) and not same_grid(moved, ct)
    stretched = sitk.Image(ct)
    stretched.SetSpacing([s * 1.001 for s in ct.GetSpacing()])  # the far corner moves 0.04 voxel
    with pytest.raises(ValueError, match=r"the CT \(spacing .* vs .*\); resample"):
        check_same_grid(stretched, ct, "the CT", advice="resample")


def test_a_note_column_and_structured_columns_that_disagree_are_refused(archive, tmp_path, capsys):
    import runpy
    from pathlib import Path

    ct = archive.parent / "cts" / "ct0.nrrd"
    agree = write_manifest(tmp_path, [{"case_id": "a", "ct": str(ct), "note": "N1, breast conserving surgery, left side",
                                       "side": "left", "n_stage": "pN1a", "surgery": "lumpectomy"}])
    assert [r["case_id"] for r in read_manifest(agree, check=True)] == ["a"]
    bad = write_manifest(tmp_path, [{"case_id": "a", "ct": str(ct), "note": "N1, breast conserving surgery, left side",
                                     "side": "right", "n_stage": "N1", "surgery": "bcs"}])
    with pytest.raises(ManifestError) as info:
        read_manifest(bad, check=True)
    message = str(info.value)
    assert "line 2 (case a)" in message and "'side' column" in message and "'note' column" in message
    assert "'left'" in message and "'right'" in message and "correct one of them" in message
    script = Path(__file__).resolve().parent.parent / "Resources" / "scripts" / "mmcontour_batch.py"
    batch_script = runpy.run_path(str(script))
    assert batch_script["main"](["--manifest", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'side' column" in err and "'left'" in err and "'right'" in err
    assert not (tmp_path / "out").exists()


def test_manifest_runs_write_the_structures_and_list_them(archive, tiny_structure_bundle, tmp_path):
    from MMContourLib.image.readwrite import read_segmentation
    from MMContourLib.note.structures import structure_classes

    out = tmp_path / "structures"
    run(archive, out, tiny_structure_bundle)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures_mode"] == "both"
    ok = [c for c in summary["cases"] if c["status"] == "ok"]
    assert [c["case_id"] for c in ok] == ["c0", "c2", "c4"]
    for case in ok:
        assert [s["name"] for s in case["structures"]] == list(structure_classes())
        assert all(isinstance(s["volume_cc"], float) and s["volume_cc"] >= 0 for s in case["structures"])
        drawn = [s["name"] for s in case["structures"] if s["volume_cc"] > 0]
        assert list(read_segmentation(out / f"{case['case_id']}.seg.nrrd")) == case["segments"] == ["CTV", *drawn]
        assert abs(sum(s["volume_cc"] for s in case["structures"]) - case["volume_cc"]) < 0.1
    # another mode: every output is redone with only the CTV (an output made with a mode is kept only for it)
    run(archive, out, tiny_structure_bundle, "--structures", "union")
    again = json.loads((out / "summary.json").read_text())
    status = {c["case_id"]: c["status"] for c in again["cases"]}
    assert [status[c] for c in ("c0", "c2", "c4")] == ["redone: structures changed"] * 3
    assert list(read_segmentation(out / "c0.seg.nrrd")) == ["CTV"]
    run(archive, out, tiny_structure_bundle, "--structures", "union")
    assert {c["case_id"]: c["status"] for c in json.loads((out / "summary.json").read_text())["cases"]}["c0"] \
        == "skipped"
