"""Training: manifest reading, deterministic sampling, a learnable task, kill -9 + resume, two-process DDP."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_ct
from safetensors.torch import load_file

from MMContourLib.model.bundle import ModelBundle
from MMContourLib.cli.main import main
from MMContourLib.data.manifest import ManifestError, read_cases as read_manifest
from MMContourLib.data.dataset import (PatchDataset, build_cache, collate, epoch_plan,
                               sample_transforms, select_fraction)
from MMContourLib.image.preprocess import PreprocessConfig
from MMContourLib.training.train import TrainConfig, TrainingError, train
from MMContourLib.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SPACING, PATCH = (6.0, 6.0, 9.0), (32, 32, 16)


def write_cases(folder: Path, n: int = 6, n_val: int = 2) -> Path:
    """Small CTs (make_ct) with an ellipsoid CTV in the breast of the note's side; a manifest CSV."""
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        side = ("left", "right")[i % 2]
        ct = make_ct(seed=i)
        z, y, x = np.meshgrid(*(np.arange(s) for s in ct.GetSize()[::-1]), indexing="ij")
        cx = 34 if side == "left" else 13  # identity direction: index x grows towards the patient's left
        ctv = ((x - cx) / 7.0) ** 2 + ((y - 20) / 6.0) ** 2 + ((z - 12) / 6.0) ** 2 <= 1
        mask = sitk.GetImageFromArray(ctv.astype(np.uint8))
        mask.CopyInformation(ct)
        sitk.WriteImage(ct, str(folder / f"cases/c{i}_ct.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"cases/c{i}_ctv.nii.gz"))
        rows.append({"case_id": f"c{i}", "ct": f"cases/c{i}_ct.nii.gz", "ctv": f"cases/c{i}_ctv.nii.gz",
                     "split": "train" if i < n - n_val else "val", "age": 50 + i, "side": side, "t_stage": "T1c",
                     "n_stage": ("N0", "N2")[i // 2 % 2], "m_stage": "M0", "surgery": "bcs",
                     "chemotherapy": "adjuvant", "pathology": "IDC"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("train-data"))


def tiny_config(manifest, out, llm, **changes) -> TrainConfig:
    values = dict(manifest=str(manifest), out=str(out), text_encoder="llm", llm=str(llm), feature_size=4,
                  spacing=SPACING, patch=PATCH, batch_size=2, epochs=3, lr=3e-3, warmup_epochs=0, val_every=1,
                  progress=False, device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def weights(bundle_dir: Path) -> dict:
    return load_file(str(Path(bundle_dir) / "weights.safetensors"))


# -- data ---------------------------------------------------------------------------------------------------

def test_read_manifest_resolves_paths_and_names_bad_rows(manifest, tmp_path):
    cases = read_manifest(manifest)
    assert [c.case_id for c in cases] == [f"c{i}" for i in range(6)]
    assert cases[0].ct == manifest.parent / "cases/c0_ct.nii.gz" and cases[0].ct.is_file()
    assert cases[2].prompt == "N2, breast conserving surgery, left side"
    assert len(read_manifest(manifest, split="val")) == 2

    text = manifest.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([text[0], text[1].replace("bcs", "appendectomy")]) + "\n")
    with pytest.raises(ManifestError, match=r"line 2 \(case c0\).*surgery"):
        read_manifest(bad)
    bad.write_text("\n".join([text[0], text[1].replace("cases/c0_ct", "cases/nope")]) + "\n")
    with pytest.raises(ManifestError, match="ct not found"):
        read_manifest(bad)
    bad.write_text(text[0].replace("split,", "") + "\n")
    with pytest.raises(ManifestError, match="lacks the column"):
        read_manifest(bad)


def test_fraction_subsets_are_seeded_and_nested(manifest):
    cases = read_manifest(manifest, split="train")
    half = select_fraction(cases, 0.5, seed=3)
    assert len(half) == 2 and half == select_fraction(cases, 0.5, seed=3)
    assert {c.case_id for c in select_fraction(cases, 0.25, seed=3)} <= {c.case_id for c in half}
    assert len(select_fraction(cases, 1.0, seed=3)) == 4
    with pytest.raises(ValueError):
        select_fraction(cases, 0.0, seed=3)


def test_epoch_plan_two_ranks_share_the_global_batch():
    one = epoch_plan(5, epoch=2, seed=7, batch_size=2, world_size=1)
    ranks = [epoch_plan(5, epoch=2, seed=7, batch_size=1, world_size=2, rank=r) for r in (0, 1)]
    assert len(one) == 3 and all(len(b) == 2 for b in one)  # 5 cases -> 3 steps, the last one wraps round
    assert [[r0[0], r1[0]] for r0, r1 in zip(*ranks)] == one
    assert sorted({i for b in one for i, _ in b}) == [0, 1, 2, 3, 4]
    assert one == epoch_plan(5, epoch=2, seed=7, batch_size=2)
    assert one != epoch_plan(5, epoch=3, seed=7, batch_size=2)


def test_patches_are_deterministic_per_key_and_cover_the_ctv(manifest):
    cases = read_manifest(manifest, split="train")
    cache = build_cache(cases, PreprocessConfig(spacing=SPACING), (16, 16, 16), progress=False)
    dataset = PatchDataset(cache, sample_transforms((16, 16, 16)))
    a, b = dataset[(0, 123)], dataset[(0, 123)]
    assert a["image"].shape == (1, 16, 16, 16) and a["label"].shape == (1, 16, 16, 16)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["prompt"] == cases[0].prompt
    patches = [dataset[(0, s)] for s in range(12)]
    assert len({float(p["image"].sum()) for p in patches}) > 6  # different crops / augmentation per seed
    assert sum(bool(p["label"].any()) for p in patches) >= 6  # pos:neg = 2:1 around the CTV
    assert 0 < float(cache[0]["image"].max()) <= 1.0 and set(np.unique(cache[0]["label"])) == {0, 1}
    batch = collate(patches[:3])
    assert batch["image"].shape == (3, 1, 16, 16, 16) and len(batch["prompt"]) == 3


def test_the_shift_margin_puts_the_body_at_varying_distances_from_the_patch_edges(manifest):
    """A patch as wide as the CT's field of view shows the body at one place only, and a network learns that
    place (v6 lost the internal mammary nodes when a CT's model grid was wider). With ``shift_margin_mm`` the
    cache holds air and background around the CT, and the crops put the body at varying offsets."""
    from MMContourLib.data.dataset import BODY_THRESHOLD

    cases = read_manifest(manifest, split="train")[:1]
    config = PreprocessConfig(spacing=SPACING)
    plain = build_cache(cases, config, PATCH, progress=False)
    nx, ny = plain[0]["image"].shape[1:3]
    patch = (nx, ny, 16)  # the CT's whole width and depth
    padded = build_cache(cases, config, patch, progress=False, shift_margin_mm=30.0)  # 5 voxels of 6 mm
    image, label = np.asarray(padded[0]["image"]), np.asarray(padded[0]["label"])
    assert image.shape[1:3] == (nx + 10, ny + 10)
    assert not image[0, :5].any() and not image[0, -5:].any() and not image[0, :, :5].any()  # air: -1000 HU
    assert label.sum() == np.asarray(plain[0]["label"]).sum()  # the whole CTV, moved, not cut

    def body_edges(cache):
        dataset = PatchDataset(cache, sample_transforms(patch))
        edges = set()
        for seed in range(16):
            body = dataset[(0, seed)]["image"][0].numpy() > BODY_THRESHOLD
            xs, ys = np.nonzero(body.any(axis=(1, 2)))[0], np.nonzero(body.any(axis=(0, 2)))[0]
            edges.add((int(xs[0]), int(ys[0])))
        return edges

    assert len(body_edges(build_cache(cases, config, patch, progress=False))) == 1
    assert len(body_edges(padded)) >= 4


def test_oversampled_cases_are_visited_k_times_per_epoch_and_a_typo_is_refused(manifest, tmp_path, capsys):
    from MMContourLib.data.dataset import case_visits, parse_oversample

    cases = read_manifest(manifest, split="train")  # c0 left, c1 right, c2 left, c3 right
    assert case_visits(cases) == [0, 1, 2, 3]
    assert case_visits(cases, ["side=left:3"]) == [0, 0, 0, 1, 2, 2, 2, 3]
    assert case_visits(cases, ["side=left:3", "n_stage=N2:2"]) == [0, 0, 0, 1, 2, 2, 2, 3, 3]  # the largest K
    assert parse_oversample(" side = both : 4") == ("side", "both", 4)
    for rule, why in (("side=both", "COLUMN=VALUE:K"), ("side=left:0", "K >= 1"), ("sides=left:2", "no column 'sides'"),
                      ("side=both:4", "no training case has side = 'both'")):
        with pytest.raises(ValueError, match=why):
            case_visits(cases, [rule])
    # through training: 8 visits -> 4 steps of 2 per epoch (2 without), recorded in the bundle
    out = tmp_path / "over"
    main(["train", "--manifest", str(manifest), "--out", str(out), "--text-encoder", "none", "--feature-size", "4",
          "--spacing", *map(str, SPACING), "--patch", *map(str, PATCH), "--epochs", "1", "--warmup-epochs", "0",
          "--device", "cpu", "--oversample", "side=left:3", "--json"])
    history = json.loads((out / "log.json").read_text())
    assert history[0]["step"] == 4
    bundle = ModelBundle.load(out / "last")
    assert bundle.training["oversample"] == ["side=left:3"] and bundle.training["visits_per_epoch"] == 8
    capsys.readouterr()
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "typo"), "--text-encoder", "none",
                 "--feature-size", "4", "--spacing", *map(str, SPACING), "--patch", *map(str, PATCH), "--epochs", "1",
                 "--device", "cpu", "--oversample", "sid=left:3", "--json"]) == 2
    assert "no column 'sid'" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "last").exists()


def with_regions(manifest: Path, label: int = 5) -> Path:
    """The manifest plus a ``regions`` column: label ``label`` exactly on each case's CTV, 1 on a box beside it."""
    rows = list(csv.DictReader(open(manifest)))
    for row in rows:
        ctv = sitk.ReadImage(str(manifest.parent / row["ctv"]))
        values = sitk.GetArrayFromImage(ctv).astype(np.uint8) * label
        values[2:6, 2:8, 2:8] = 1
        regions = sitk.GetImageFromArray(values)
        regions.CopyInformation(ctv)
        row["regions"] = row["ctv"].replace("_ctv", "_regions")
        sitk.WriteImage(regions, str(manifest.parent / row["regions"]))
    out = manifest.parent / "manifest-regions.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_emphasis_map_follows_the_chosen_region_labels_through_the_crops(manifest):
    regions_manifest = with_regions(manifest)
    cases = read_manifest(regions_manifest, split="train")
    assert all(c.regions is not None for c in cases)
    cache = build_cache(cases, PreprocessConfig(spacing=SPACING), PATCH, progress=False, emphasis_labels=(5,))
    dataset = PatchDataset(cache, sample_transforms(PATCH))
    patches = [dataset[(i % len(cases), s)] for i, s in enumerate(range(8))]
    assert sum(bool(p["label"].any()) for p in patches) >= 4
    for p in patches:  # label 5 sits exactly on the CTV, so the cropped emphasis and label agree voxel by voxel
        assert p["emphasis"].shape == p["label"].shape
        assert torch.equal(p["emphasis"] > 0.5, p["label"] > 0.5)
        assert torch.equal(p["soft"] > 0.5, p["label"] > 0.5)  # the 0/1 label is the thresholded fraction
    assert any(bool(((p["soft"] > 0) & (p["soft"] < 1)).any()) for p in patches)  # partial-volume borders
    assert float(cache[0]["emphasis"].max()) == pytest.approx(1.0) and float(cache[0]["emphasis"].min()) == 0.0
    # label 1 (the box) was not chosen; without labels the map is all zeros
    plain = build_cache(cases, PreprocessConfig(spacing=SPACING), PATCH, progress=False)
    assert not np.asarray(plain[0]["emphasis"]).any()
    box = build_cache(cases[:1], PreprocessConfig(spacing=SPACING), PATCH, progress=False, emphasis_labels=(1,))
    assert np.asarray(box[0]["emphasis"]).any() and not (np.asarray(box[0]["emphasis"])[cache[0]["label"] > 0] > 0.5).any()


def test_the_emphasis_margin_moves_the_weight_step_off_the_structure_border(manifest):
    """With ``emphasis_margin_mm`` the weighted region reaches that far beyond the emphasised structure (in mm,
    whatever the grid's spacing per axis), so a voxel just outside the border weighs as much as one just
    inside; beyond the margin the weight is back to 1."""
    from scipy import ndimage

    from MMContourLib.data.dataset import grow_emphasis

    cases = read_manifest(with_regions(manifest), split="train")[:1]
    plain = np.asarray(build_cache(cases, PreprocessConfig(spacing=SPACING), PATCH, progress=False,
                                   emphasis_labels=(5,))[0]["emphasis"][0])
    grown = np.asarray(build_cache(cases, PreprocessConfig(spacing=SPACING), PATCH, progress=False,
                                   emphasis_labels=(5,), emphasis_margin_mm=12.0)[0]["emphasis"][0])
    inside = plain > 0.5
    assert inside.any() and (grown >= plain).all()
    # distance (mm) of every voxel from the emphasised structure, on the anisotropic 6 x 6 x 9 mm grid
    distance = ndimage.distance_transform_edt(~inside, sampling=SPACING)
    # the border's outside weighs as its inside (a voxel mostly inside, > 0.5, at least)
    assert (grown[(distance > 0) & (distance <= 12.0)] > 0.5).all()
    touched = ndimage.distance_transform_edt(plain == 0, sampling=SPACING)  # from any partial voxel
    assert grown[touched > 12.0].max() == 0.0  # and beyond the margin, nothing
    assert grown[(distance > 0) & (distance <= 12.0)].size > inside.sum()  # a real ring, not a no-op
    # the z axis (9 mm) grows by 1 voxel, x and y (6 mm) by 2
    point = np.zeros((7, 7, 7), np.float32)
    point[3, 3, 3] = 0.7
    ring = grow_emphasis(point, (6.0, 6.0, 9.0), 12.0)
    assert ring[1, 3, 3] == ring[3, 5, 3] == ring[3, 3, 4] == pytest.approx(0.7)
    assert ring[0, 3, 3] == ring[3, 3, 5] == 0.0
    assert grow_emphasis(point, (6.0, 6.0, 9.0), 0.0) is point


def test_sharded_batches_average_to_the_global_batch_gradient(manifest, tiny_llm_dir):
    """What DDP relies on: the mean of per-sample gradients of Dice+CE equals the batch-of-2 gradient."""
    from monai.losses import DiceCELoss

    from MMContourLib.model.network import NetworkConfig, TextConditionedUNet
    from MMContourLib.model.text import TextEncoderSpec, build_text_encoder
    from MMContourLib.training.step import TrainableModel

    text = build_text_encoder(TextEncoderSpec(kind="causal-lm", source=str(tiny_llm_dir), num_vectors=2))
    torch.manual_seed(0)
    model = TrainableModel(TextConditionedUNet(NetworkConfig(feature_size=4, text_dim=text.dim)), text)
    # the note-embedding statistics move with every training forward (under DDP by an all-reduced
    # update); hold them still so the three gradient evaluations below see the same function
    model.network.text_norm.eval()
    cases = read_manifest(manifest, split="train")
    dataset = PatchDataset(build_cache(cases, PreprocessConfig(spacing=SPACING), PATCH, progress=False),
                           sample_transforms(PATCH))
    keys = epoch_plan(len(cases), 0, 0, batch_size=2)[0]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def grads(samples):
        model.zero_grad()
        batch = collate(samples)
        loss_fn(model(batch["image"], batch["prompt"]), batch["label"]).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    both = grads([dataset[k] for k in keys])
    shards = [grads([dataset[k]]) for k in keys]
    assert any(k.startswith("text.") for k in both)
    for k, g in both.items():
        torch.testing.assert_close(g, (shards[0][k] + shards[1][k]) / 2, atol=1e-6, rtol=1e-4, msg=k)


# -- training -------------------------------------------------------------------------------------------------

def test_training_learns_and_writes_bundles_logs_and_refuses_to_overwrite(manifest, tiny_llm_dir, tmp_path):
    out = tmp_path / "run"
    events = []
    result = train(tiny_config(manifest, out, tiny_llm_dir, epochs=6, val_every=2),
                   callbacks=[lambda event, info: events.append(event)])
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert [r["val_dice"] is not None for r in result.history] == [False, True, False, True, False, True]
    assert events.count("epoch") == 6 and events.count("step") == 12  # 4 training cases, batch 2
    for name in ("log.csv", "log.json", "loss_curve.png", "checkpoint.pt", "train_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "log.json").read_text()) == result.history

    best, last = ModelBundle.load(out / "best"), ModelBundle.load(out / "last")
    assert last.training["epochs"] == 6 and last.training["seed"] == 0 and last.training["train_cases"] == 4
    assert last.training["manifest_hash"].startswith("sha256:") and last.training["data_fraction"] == 1.0
    assert best.training["best_val_dice"] == result.best_val_dice == max(r["val_dice"] for r in result.history
                                                                         if r["val_dice"] is not None)
    assert last.text_encoder.kind == "causal-lm" and last.text_encoder.fingerprint
    assert tuple(last.inference.roi_size) == PATCH and tuple(last.preprocessing.spacing) == SPACING
    assert last.prompt_template_version == last.training["prompt_template_version"] == "table5-v2"

    from MMContourLib.inference.contourer import Contourer

    contour = Contourer(best, device="cpu").contour(make_ct(seed=9), "N0, BCS, left side")
    assert contour.mask.GetSize() == make_ct().GetSize()

    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(manifest, out, tiny_llm_dir))


def test_region_weight_trains_through_the_cli_and_needs_region_maps(manifest, tiny_llm_dir, tmp_path):
    with pytest.raises(TrainingError, match="regions"):
        train(tiny_config(manifest, tmp_path / "none", tiny_llm_dir, epochs=1, region_weight=5.0))
    regions_manifest = with_regions(manifest)
    out = tmp_path / "weighted"
    main(["train", "--manifest", str(regions_manifest), "--out", str(out), "--text-encoder", "none",
          "--feature-size", "4", "--spacing", *map(str, SPACING), "--patch", *map(str, PATCH), "--epochs", "2",
          "--lr", "3e-3", "--warmup-epochs", "0", "--device", "cpu", "--region-weight", "5",
          "--emphasis-labels", "5", "--soft-labels", "--class-balance", "1", "--shift-margin", "24",
          "--emphasis-margin", "12", "--json"])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["region_weight"] == 5.0 and saved["emphasis_labels"] == [5] and saved["soft_labels"] is True
    assert saved["class_balance"] == 1.0 and saved["shift_margin_mm"] == 24.0 and saved["emphasis_margin_mm"] == 12.0
    bundle = ModelBundle.load(out / "last")
    assert bundle.training["region_weight"] == 5.0 and bundle.training["class_balance"] == 1.0
    assert bundle.training["shift_margin_mm"] == 24.0 and bundle.training["emphasis_margin_mm"] == 12.0
    with pytest.raises(ValueError, match="shift margin"):
        tiny_config(manifest, tmp_path / "neg", tiny_llm_dir, shift_margin_mm=-1.0)
    with pytest.raises(ValueError, match="emphasis margin"):
        tiny_config(manifest, tmp_path / "neg", tiny_llm_dir, emphasis_margin_mm=-1.0)
    assert bundle.network.structures  # the term is on the per-structure loss these maps train
    with pytest.raises(ValueError, match="balance"):
        tiny_config(manifest, tmp_path / "neg", tiny_llm_dir, class_balance=-1.0)
    history = json.loads((out / "log.json").read_text())
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)


def test_vision_only_on_a_fraction_through_the_cli(manifest, tmp_path, capsys):
    out = tmp_path / "vision"  # --resume with nothing to resume yet starts from the beginning
    code = main(["train", "--manifest", str(manifest), "--out", str(out), "--resume", "--text-encoder", "none",
                 "--fraction", "0.5", "--feature-size", "4", "--spacing", *map(str, SPACING),
                 "--patch", *map(str, PATCH), "--epochs", "1", "--batch-size", "1", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["epochs"] == 1 and summary["best_val_dice"] is not None
    bundle = ModelBundle.load(out / "last")
    assert bundle.text_encoder.kind == "none" and bundle.network.text_dim is None
    assert bundle.training["train_cases"] == 2 and bundle.training["data_fraction"] == 0.5
    assert not any(k.startswith("text.") for k in bundle.weights)


def test_init_starts_from_a_bundles_weights_and_refuses_another_network(manifest, tmp_path, capsys):
    """--init: fine-tuning starts from the bundle's weights (a learning rate of 0 keeps them exactly) and is
    recorded; a bundle of another width is refused with the difference named."""
    base = tmp_path / "base"
    args = ["--manifest", str(manifest), "--text-encoder", "none", "--feature-size", "4", "--spacing",
            *map(str, SPACING), "--patch", *map(str, PATCH), "--epochs", "1", "--device", "cpu", "--json"]
    assert main(["train", "--out", str(base), "--lr", "3e-3", "--seed", "1", *args]) == 0
    capsys.readouterr()
    tuned = tmp_path / "tuned"
    assert main(["train", "--out", str(tuned), "--lr", "0", "--seed", "2", "--init", str(base / "last"), *args]) == 0
    capsys.readouterr()
    before, after = weights(base / "last"), weights(tuned / "last")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = tmp_path / "fresh"  # the same run without --init starts elsewhere (seed 2's initialisation)
    assert main(["train", "--out", str(fresh), "--lr", "0", "--seed", "2", *args]) == 0
    assert not all(torch.equal(before[k], weights(fresh / "last")[k]) for k in before)
    assert ModelBundle.load(tuned / "last").training["init_bundle"]["bundle_id"] == ModelBundle.load(base / "last").bundle_id
    wider = [a if a != "4" else "8" for a in args]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "wider"), "--init", str(base / "last"), *wider]) == 2
    assert "feature_size 4 (this run: 8)" in capsys.readouterr().err


def test_the_prompt_template_is_a_setting_the_bundle_and_the_checkpoint_keep(manifest, tiny_llm_dir, tmp_path):
    """--prompt-template table5-v1 trains a bundle read the paper's way; a checkpoint written before the
    template was a setting resumes with table5-v1, the reading it started with."""
    out = tmp_path / "v1"
    train(tiny_config(manifest, out, tiny_llm_dir, epochs=1, prompt_template="table5-v1"))
    bundle = ModelBundle.load(out / "last")
    assert bundle.prompt_template_version == bundle.training["prompt_template_version"] == "table5-v1"
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["prompt_template"] == "table5-v1"
    del state["config"]["prompt_template"]
    save_checkpoint(out / "checkpoint.pt", state)
    assert load_checkpoint(out / "checkpoint.pt")["config"]["prompt_template"] == "table5-v1"
    with pytest.raises(ValueError, match="unknown prompt template"):
        train(tiny_config(manifest, tmp_path / "bad", tiny_llm_dir, epochs=1, prompt_template="table5-v9"))


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from MMContourLib.training.train import TrainConfig, train

    def kill(event, info):  # SIGKILL half-way through epoch 2, after epoch 1's checkpoint
        if event == "step" and info["epoch"] == 2 and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    train(TrainConfig.from_dict(json.loads(sys.argv[1])), callbacks=[kill])
""")


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_uninterrupted_result(manifest, tiny_llm_dir, tmp_path, capsys):
    full = train(tiny_config(manifest, tmp_path / "full", tiny_llm_dir))

    killed = tmp_path / "killed"
    config = tiny_config(manifest, killed, tiny_llm_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same arithmetic as this process
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(config.to_dict())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((killed / "log.json").read_text())[-1]["epoch"] == 1
    assert not (killed / "last").exists() or ModelBundle.load(killed / "last").training["epochs"] == 1

    with pytest.raises(TrainingError, match="lr"):  # a resumed run keeps its settings
        train(tiny_config(manifest, killed, tiny_llm_dir, lr=1e-3), resume=True)
    code = main(["train", "--manifest", str(manifest), "--out", str(killed), "--resume", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    resumed = json.loads((killed / "log.json").read_text())
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full.history]
    a, b = weights(tmp_path / "full" / "last"), weights(killed / "last")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact: same arithmetic in the same order
    assert ModelBundle.load(killed / "best").training["best_epoch"] == full.best_epoch


@pytest.mark.slow
def test_two_gloo_processes_train_the_model_one_process_trains(manifest, tiny_llm_dir, tmp_path):
    """torchrun, 2 CPU processes x batch 1 vs 1 process x batch 2. Gradients agree to float precision
    (test above), but AdamW's first steps divide each gradient by its own magnitude, so parameters
    whose true gradient is zero (key biases before a softmax, ...) move by +-lr on rounding noise:
    weights are compared by the size of their difference relative to the update, and predictions
    and losses closely."""
    single = train(tiny_config(manifest, tmp_path / "one", tiny_llm_dir, epochs=2))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "MMContourLib.cli", "train", "--manifest", str(manifest), "--out", str(out), "--llm",
           str(tiny_llm_dir), "--feature-size", "4", "--spacing", *map(str, SPACING), "--patch", *map(str, PATCH),
           "--batch-size", "1", "--epochs", "2", "--lr", "3e-3", "--warmup-epochs", "0", "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = ModelBundle.load(out / "last")
    assert two.training["processes"] == 2 and two.training["batch_size"] == 2
    history = json.loads((out / "log.json").read_text())
    for r1, r2 in zip(single.history, history):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)

    from MMContourLib.model.network import NetworkConfig, TextConditionedUNet

    torch.manual_seed(0)
    init = {f"net.{k}": v for k, v in TextConditionedUNet(NetworkConfig(feature_size=4, text_dim=32)).state_dict().items()}
    a, b = weights(tmp_path / "one" / "last"), two.weights
    assert a.keys() == b.keys()
    diff = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))
    update = math.sqrt(sum(float(((a[k] - init[k]) ** 2).sum()) for k in init))
    assert diff < 0.05 * update, (diff, update)

    from MMContourLib.inference.contourer import Contourer

    ct = make_ct(seed=11)
    p1 = sitk.GetArrayFromImage(Contourer.from_bundle(tmp_path / "one" / "last", device="cpu").contour(
        ct, "N2, BCS, left side").probability)
    p2 = sitk.GetArrayFromImage(Contourer.from_bundle(out / "last", device="cpu").contour(
        ct, "N2, BCS, left side").probability)
    assert np.abs(p1 - p2).max() < 0.02


def test_default_emphasis_labels_are_the_phantoms_nodal_levels():
    from MMContourLib.note.targets import NODAL_REGIONS, REGION_LABELS, labels_of
    from MMContourLib.training.train import DEFAULT_EMPHASIS_LABELS

    # every nodal region and its parts (the axillary levels), on both sides; no breast or chest wall
    assert set(DEFAULT_EMPHASIS_LABELS) == {v for r in NODAL_REGIONS for s in ("left", "right")
                                            for v in labels_of(f"{r}_{s}")}
    assert {REGION_LABELS[k] for k in REGION_LABELS if k.startswith(("breast", "chestwall"))}.isdisjoint(
        DEFAULT_EMPHASIS_LABELS)
