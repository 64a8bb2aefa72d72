"""`mmcontour side-flips`: one-sided phantom training cases written again with the other side in the note and
the CTV that note asks for on the same CT (docs/results.md: a visible mastectomy must not outvote the note)."""
from __future__ import annotations

import csv

import numpy as np
import SimpleITK as sitk

from MMContourLib.cli.main import main
from MMContourLib.data.manifest import read_cases
from MMContourLib.note.targets import REGION_LABELS, ctv_for_note, labels_of


def _phantoms(tmp_path, n=4):
    assert main(["phantom", "--n", str(n), "--out", str(tmp_path / "ph"), "--seed", "3", "--bilateral-share", "0",
                 "--splits", "1", "0", "0", "--json"]) == 0
    return tmp_path / "ph" / "manifest.csv"


def test_flipped_cases_keep_the_ct_and_get_the_other_sides_guideline_ctv(tmp_path, capsys):
    manifest = _phantoms(tmp_path)
    out = tmp_path / "flips"
    assert main(["side-flips", str(manifest), "--out", str(out), "--share", "1", "--seed", "1"]) == 0
    assert "wrote 4 side-flipped cases" in capsys.readouterr().out
    originals = {c.case_id: c for c in read_cases(manifest)}
    flipped = read_cases(out / "manifest.csv")
    assert sorted(c.case_id for c in flipped) == sorted(f"{k}-flip" for k in originals)
    for case in flipped:
        source = originals[case.case_id.removesuffix("-flip")]
        assert case.split == "train" and case.ct.resolve() == source.ct.resolve()
        assert case.regions.resolve() == source.regions.resolve()
        assert {case.note.side, source.note.side} == {"left", "right"}
        assert (case.note.sides[0].surgery, case.note.sides[0].n_stage) == \
            (source.note.sides[0].surgery, source.note.sides[0].n_stage)
        regions = sitk.ReadImage(str(case.regions))
        ctv = sitk.GetArrayFromImage(sitk.ReadImage(str(case.ctv)))
        assert np.array_equal(ctv, sitk.GetArrayFromImage(ctv_for_note(regions, case.note)))
        # every voxel of the new CTV is a region of the note's side, none of the side the CT was treated on
        values = set(np.unique(sitk.GetArrayFromImage(regions)[ctv > 0]).tolist())
        sided = {v: k.rsplit("_", 1)[1] for k, v in REGION_LABELS.items() if k.rsplit("_", 1)[1] in ("left", "right")}
        assert values and {sided[v] for v in values} == {case.note.side}
        if source.note.sides[0].surgery == "mastectomy":  # the note's chest wall, under a breast the CT still shows
            assert set(labels_of(f"chestwall_{case.note.side}")) & values
    # the flipped set merges with its source into one training manifest
    merged = tmp_path / "train.csv"
    assert main(["merge-manifests", str(manifest), str(out / "manifest.csv"), "--out", str(merged)]) == 0
    assert len(read_cases(merged)) == 8


def test_a_share_picks_that_many_cases_by_seed_and_bad_requests_are_refused(tmp_path, capsys):
    manifest = _phantoms(tmp_path)
    ids = lambda folder: [c.case_id for c in read_cases(folder / "manifest.csv")]
    assert main(["side-flips", str(manifest), "--out", str(tmp_path / "a"), "--share", "0.5", "--seed", "2"]) == 0
    assert main(["side-flips", str(manifest), "--out", str(tmp_path / "b"), "--share", "0.5", "--seed", "2"]) == 0
    assert len(ids(tmp_path / "a")) == 2 and ids(tmp_path / "a") == ids(tmp_path / "b")
    capsys.readouterr()
    assert main(["side-flips", str(manifest), "--out", str(tmp_path / "a"), "--share", "0.5"]) == 2  # no overwrite
    assert main(["side-flips", str(manifest), "--out", str(tmp_path / "c"), "--share", "0"]) == 2
    assert "--share must lie in (0, 1]" in capsys.readouterr().err
    # a hospital export has no regions map of both sides: it cannot be flipped, and says why
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    plain = tmp_path / "ph" / "plain.csv"
    columns = [c for c in rows[0] if c != "regions"]
    with open(plain, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["side-flips", str(plain), "--out", str(tmp_path / "d"), "--share", "1"]) != 0
    assert "no regions map" in capsys.readouterr().err
    assert not (tmp_path / "d" / "manifest.csv").exists()
