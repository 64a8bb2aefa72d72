"""Archive-scale predict: ``mmcontour predict --manifest CSV --out DIR`` (one bad case, sharding)."""
import csv
import json

import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib import cli
from MMContourLib.batch import ManifestError, read_manifest

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
