"""What ``mmcontour evaluate`` writes (``training.evaluate``): ``table.md`` (paper Table 1 layout, then side
found, per-structure Dice, review flags, anatomical range and text-following), ``overlays/<model>/<case>.png``,
``cases.csv`` (one flat row per case) and ``metrics.json`` (non-finite numbers as null)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..image.fileio import atomic_write as _atomic, write_json


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f} ({stat['ci_low']:.{digits}f}-{stat['ci_high']:.{digits}f})"
    if stat.get("excluded"):
        text += f" [{stat['excluded']} n/a]"
    return text


def write_table(models: Sequence[dict], path: Path, side_share: float = 0.8) -> Path:
    """Paper Table 1 layout: one row per model, mean (95% CI); then side found, per-structure Dice (paper
    Table 2's place: one row per structure, one column per model) and text-following (Table 3's)."""
    lines = ["| Model | Dice | IoU | HD95 (mm) | Clinical accuracy |", "|---|---|---|---|---|"]
    for m in models:
        clinical = _fmt(m.get("clinical", {}).get("correct"))
        lines.append(f"| {m['model']} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | {_fmt(m['hd95_mm'], 2)} | {clinical} |")
    lines.append("")
    lines.append(f"Mean (95% bootstrap CI over cases, {models[0]['dice']['n'] if models else 0} cases). "
                 "HD95 on each CT's own grid in mm; [k n/a]: cases without a surface (empty contour), left out.")
    if any("side_found" in m for m in models):
        lines += ["", "| Model | Text encoder | Side found, all cases | Side found, unilateral cases |",
                  "|---|---|---|---|"]
        for m in models:
            lines.append(f"| {m['model']} | {m.get('text_encoder') or 'n/a'} | {_fmt(m.get('side_found'), 2)} | "
                         f"{_fmt(m.get('side_found_unilateral'), 2)} |")
        lines += ["", "Side found: the contour's volume lies on the note's treated side(s) (unilateral: more than "
                      f"{100 * side_share:.0f} % of it on that side; bilateral: at least {100 * (1 - side_share):.0f} % "
                      "on each), from the volumes alone."]
    per = [m.get("structures", {}) for m in models]
    if any(p.get("available") for p in per):
        names = list(dict.fromkeys(n for p in per if p.get("available") for n in p["dice"]))
        lines += ["", "| Structure | " + " | ".join(m["model"] for m in models) + " |",
                  "|---|" + "---|" * len(models)]
        cell = lambda p, n: (_fmt(p["dice"].get(n)) + f" [n={p['dice'][n]['n']}]" if n in p["dice"] else "n/a") \
            if p.get("available") else "n/a"
        for n in names:
            lines.append(f"| {n} | " + " | ".join(cell(p, n) for p in per) + " |")
        lines.append("| mean per case | " + " | ".join(_fmt(p.get("mean_dice")) if p.get("available") else "n/a"
                                                     for p in per) + " |")
        lines += ["", "Per-structure Dice, mean (95% CI) over the cases where the structure is in the truth or the "
                      "contour [n cases]."]
        for m, p in zip(models, per):
            if not p.get("available"):
                lines.append(f"{m['model']}: {p.get('why', 'no per-structure numbers')}.")
    elif per and all(not p.get("available") for p in per) and any(p.get("why") for p in per):
        lines += [""] + [f"Per-structure Dice, {m['model']}: {p['why']}." for m, p in zip(models, per) if p.get("why")]
    if any("review_flags" in m for m in models):
        lines += ["", "| Model | Wrong contours flagged | Right contours flagged |", "|---|---|---|"]
        pct = lambda k, n, d: f"{k}/{n} ({100 * d:.0f} %)" if d is not None else "n/a"
        for m in models:
            f = m.get("review_flags", {}).get("any")
            if f:
                lines.append(f"| {m['model']} | {pct(f['wrong_flagged'], f['wrong'], f['sensitivity'])} | "
                             f"{pct(f['right_flagged'], f['right'], f['false_flag_rate'])} |")
        lines += ["", "Review flags (inference/review.py) against clinical accuracy: wrong = clinical accuracy 0. "
                      "Target: >= 90 % of wrong contours flagged, <= 20 % of right ones."]
    if any((m.get("anatomical_range") or {}).get("cases_with_lung_base") for m in models):
        lines += ["", "| Model | Contours with volume caudal to the lung bases | Most there (cc) | "
                      "Removed by the range step, mean (cc) |", "|---|---|---|---|"]
        for m in models:
            a = m.get("anatomical_range") or {}
            if a.get("cases_with_lung_base"):
                lines.append(f"| {m['model']} | {a['cases_with_cc_caudal_to_lung_base']}/{a['cases_with_lung_base']} | "
                             f"{a['caudal_to_lung_base_cc_max']:.1f} | {a['dropped_cc_mean']:.1f} |")
        lines += ["", "After the anatomical range step (inference/anatomy.py); the lung base is the CT's lowest lung "
                      "voxel."]
    if any("text_following" in m for m in models):
        lines += ["", "| Model | Follows side flip | Follows N0<->N2 | Follows both | Not followed, flagged for "
                      "review (side / N) |", "|---|---|---|---|---|"]
        for m in models:
            tf = m.get("text_following", {})
            get = lambda k: _fmt(tf.get(k, {}).get("follows"), 2)
            caught = lambda k: (f"{tf[k]['not_followed_flagged']}/{tf[k]['not_followed']}"
                                if "not_followed" in tf.get(k, {}) else "n/a")
            lines.append(f"| {m['model']} | {get('side')} | {get('nodes')} | {get('all')} | "
                         f"{caught('side')} / {caught('nodes')} |")
    text = "\n".join(lines) + "\n"
    _atomic(path, lambda tmp: tmp.write_text(text))
    return path


def write_overlay(ct: sitk.Image, prediction: sitk.Image, truth: sitk.Image, path: Path, title: str = "") -> Path:
    """Axial and coronal slices through the truth's centre: CT, truth (green outline), prediction (red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    views = [sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")) for img in (ct, prediction, truth)]
    image, pred, true = views[0].astype(np.float32), views[1] > 0, views[2] > 0  # (z, y: A->P, x: R->L)
    ref = sitk.DICOMOrient(ct, "LPS")
    sx, sy, sz = ref.GetSpacing()
    focus = np.argwhere(true if true.any() else pred) if (true.any() or pred.any()) else None
    zc, yc = (np.round(focus[:, :2].mean(0)).astype(int) if focus is not None
              else (image.shape[0] // 2, image.shape[1] // 2))
    fig = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    panels = (("axial", image[zc], pred[zc], true[zc], sy / sx),
              ("coronal", image[:, yc][::-1], pred[:, yc][::-1], true[:, yc][::-1], sz / sx))
    for k, (name, img, p, t, aspect) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(np.clip(img, -400, 400), cmap="gray", aspect=aspect)
        ax.imshow(np.ma.masked_where(~p, p.astype(float)), cmap=ListedColormap(["red"]), alpha=0.35, aspect=aspect)
        for mask, colour in ((t, "lime"), (p, "red")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(f"{name} (R on the left; red: prediction, green: truth)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _flat(row: dict) -> dict:
    """One CSV row per case: nested checks become prefixed columns."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    if "clinical" in row:
        for k, v in row["clinical"].items():
            flat[f"clinical_{k}"] = ";".join(v) if isinstance(v, list) else v
    for s, v in row.get("nodal_coverage", {}).items():
        flat[f"nodal_coverage_{s}"] = v
    if row.get("structure_dice"):
        flat["dice_structures_mean"] = float(np.mean(list(row["structure_dice"].values())))
    for name, v in row.get("structure_dice", {}).items():
        flat[f"dice_{name}"] = v
    for name, v in row.get("structure_uncertain", {}).items():
        flat[f"uncertain_{name}"] = v
    for name, v in row.get("structure_left_out", {}).items():
        flat[f"left_out_{name}"] = v
    for kind, entry in row.get("counterfactual", {}).items():
        for k, v in entry.items():
            if isinstance(v, dict):
                for s, vv in v.items():
                    flat[f"cf_{kind}_{k}_{s}"] = vv
            else:
                flat[f"cf_{kind}_{k}"] = v
    return flat


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _json_safe(value.item())
    return value


def _write_json(path: Path, data: dict) -> None:
    write_json(path, _json_safe(data))


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})

    _atomic(path, write)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
