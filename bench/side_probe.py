#!/usr/bin/env python3
"""How often the CT alone shows the treated side: a small vision-only side classifier on the phantoms.

Usage: ``python3 bench/side_probe.py [--manifest data/phantoms/manifest.csv] [--external
data/external/manifest.csv] [--spacing 5] [--epochs 40] [--seed 0] [--json]``.

Issue 11 asks that the phantoms show the treated side about as often as real post-operative CTs do, so
that a vision-only model finds it in roughly 80-95 % of cases. The vision-only U-Net baseline of
``docs/results.md`` decides the side for every voxel from a patch, and at f = 8 it finds the side in
under 30 % of cases. This probe asks the question directly, as a second gauge. It sees the same CTs on
the same 5 mm model grid (``image.preprocess.to_model_grid``), is trained on the training split's
one-sided cases (``side`` left or right; bilateral cases are left out), and chooses its epoch on the
validation split. A small 3D CNN gives an evidence map; the probe's logit is that map's mean on the
body's left half minus its mean on the right half (halves split at the body's centre of mass along
R-L). So the decision is antisymmetric by construction, and every training CT is also shown mirrored
with its side swapped.

Printed: side accuracy on the test split and on the external set, per surgery (mastectomy, breast
conserving), and per whether the phantom drew a sign of the surgery that a 5 mm grid keeps
(``treatment_visible_5mm`` in ``phantom.json``, when the manifest's folder has one). Needs data from
``mmcontour phantom`` (``bench/phantom_experiments.sh data``). It takes about 5 minutes on one core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def load(manifest: str, spacing: float) -> list[dict]:
    """The one-sided cases of a manifest on the model grid: array (X: R->L, Y, Z), side 0 right / 1 left."""
    from MMContourLib.data.manifest import read_cases
    from MMContourLib.image.preprocess import PreprocessConfig, to_model_grid
    from MMContourLib.image.readwrite import read_image

    info = {}
    meta = Path(manifest).parent / "phantom.json"
    if meta.exists():
        info = json.loads(meta.read_text())["cases"]
    config = PreprocessConfig(spacing=(spacing,) * 3)
    out = []
    for case in read_cases(manifest, require_ctv=False):
        side = case.row.get("side", "")
        if side not in ("left", "right"):
            continue
        array = to_model_grid(read_image(case.ct), config).array
        shown = info.get(case.case_id, {}).get("treatment_visible_5mm", {}).get(side)
        out.append({"case_id": case.case_id, "split": case.split, "array": array.astype(np.float32),
                    "side": 1 if side == "left" else 0, "surgery": case.row.get("surgery", ""), "shown": shown})
    return out


def half_signs(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """+1 on the body's left half, -1 on its right, on a grid of ``shape`` (the evidence map's): X runs R->L,
    the halves meet at the body's centre of mass along X."""
    from MMContourLib.data.dataset import BODY_THRESHOLD

    body = array > BODY_THRESHOLD
    x = np.arange(array.shape[0], dtype=np.float64)
    mass = body.sum(axis=(1, 2))
    centre = float((x * mass).sum() / max(mass.sum(), 1))
    xs = (np.arange(shape[0]) + 0.5) * array.shape[0] / shape[0] - 0.5
    return np.broadcast_to(np.sign(xs - centre)[:, None, None], shape).astype(np.float32)


def build(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def block(i, o):
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.1))

    return nn.Sequential(block(1, 4), nn.MaxPool3d(2), block(4, 16), nn.MaxPool3d(2), block(16, 16),
                         nn.Conv3d(16, 1, 1))


def logit(net, array: np.ndarray, mirror: bool = False):
    """Left-minus-right mean evidence of one CT (mirrored along R-L when ``mirror``)."""
    import torch

    a = array[::-1].copy() if mirror else array
    evidence = net(torch.from_numpy(a)[None, None])[0, 0]
    signs = torch.from_numpy(half_signs(a, tuple(evidence.shape)))
    return (evidence * signs).mean() * 10.0


def accuracy(net, cases: list[dict]) -> float:
    import torch

    with torch.no_grad():
        right = [(logit(net, c["array"]).item() > 0) == bool(c["side"]) for c in cases]
    return float(np.mean(right)) if right else float("nan")


def breakdown(net, cases: list[dict]) -> dict:
    import torch

    rows = {}
    with torch.no_grad():
        for c in cases:
            ok = (logit(net, c["array"]).item() > 0) == bool(c["side"])
            for key in ("all", f"surgery={c['surgery']}", f"sign_at_5mm={c['shown']}"):
                n, k = rows.get(key, (0, 0))
                rows[key] = (n + 1, k + int(ok))
    return {key: {"n": n, "correct": k, "accuracy": round(k / n, 3)} for key, (n, k) in sorted(rows.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", default="data/phantoms/manifest.csv")
    parser.add_argument("--external", default="data/external/manifest.csv")
    parser.add_argument("--spacing", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    t0 = time.perf_counter()
    cases = load(args.manifest, args.spacing)
    external = load(args.external, args.spacing) if args.external and Path(args.external).exists() else []
    train = [c for c in cases if c["split"] == "train"]
    val = [c for c in cases if c["split"] == "val"]
    test = [c for c in cases if c["split"] == "test"]
    print(f"loaded {len(train)} train / {len(val)} val / {len(test)} test / {len(external)} external one-sided "
          f"cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    net = build(args.seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    best, best_state, log = -1.0, None, []
    for epoch in range(1, args.epochs + 1):
        net.train()
        losses = []
        for i in rng.permutation(len(train)):
            mirror = bool(rng.random() < 0.5)
            target = torch.tensor(float(train[i]["side"] != mirror))  # a mirrored CT's treated side is the other
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit(net, train[i]["array"], mirror), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        net.eval()
        acc = accuracy(net, val)
        log.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "val_accuracy": round(acc, 3)})
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}, validation side accuracy {acc:.3f}", file=sys.stderr)
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    result = {"spacing_mm": args.spacing, "epochs": args.epochs, "seed": args.seed, "best_val_accuracy": round(best, 3),
              "internal_test": breakdown(net, test), "external": breakdown(net, external), "log": log,
              "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("internal_test", "external"):
            for key, row in result[name].items():
                print(f"{name:14s} {key:28s} side right {row['correct']:3d}/{row['n']:3d} = {row['accuracy']:.2f}")
        print(f"(validation {best:.2f}; {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
