"""``mmcontour demo``: the offline end-to-end example a newcomer runs first.

A synthetic breast CT that the shipped bundle never saw is contoured with its true clinical note
and with counterfactual notes (other side; node-negative vs node-positive), like paper Fig. 5.
Writes the CT, one ``.seg.nrrd`` per note, ``demo.png`` and ``summary.json`` (Dice against the
phantom's guideline CTV for each note, timings per stage).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..image.metrics import dice

#: The demo phantom's seed; a test checks that the demo bundle's training set (``write_dataset``
#: with its hashed per-case seeds) never produced it.
DEMO_SEED = 1_000_003
DEMO_NOTE = "N2, breast conserving surgery, left side"


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def demo_case(seed: int = DEMO_SEED, note_text: str = DEMO_NOTE, case_id: str = "demo"):
    """The demo's synthetic planning CT (neck to upper abdomen, as the shipped bundle was trained on)."""
    from ..data.phantom import PhantomConfig, generate_case
    from ..note.clinical import ClinicalNote

    return generate_case(seed, PhantomConfig(planning_fov=True), note=ClinicalNote.parse(note_text), case_id=case_id)


def counterfactual_notes(note):
    """The true note, the other side, and the other nodal status (paper Fig. 5)."""
    from ..note.clinical import ClinicalNote, other_side

    variants = [("true note", note)]
    if note.side in ("left", "right"):
        variants.append(("other side", note.replace(side=other_side(note.side))))
    flipped_n = "N0" if any(s.node_positive for s in note.sides) else "N2"
    label = "node-negative" if flipped_n == "N0" else "node-positive"
    variants.append((label, ClinicalNote.from_fields(**{**note.to_fields(), "n_stage": flipped_n})))
    return variants


def structure_dice(result, regions: sitk.Image) -> list[dict]:
    """Per structure of a per-structure result: Dice against the note's guideline structure on the phantom
    (``training.evaluate.structure_dice``) with both volumes, for every structure in the truth or the
    contour ([] for a bundle with one CTV output)."""
    from ..note.targets import structure_label_map
    from ..training.evaluate import structure_dice as dice_per_structure

    if result.labels is None:
        return []
    scores, _unscored = dice_per_structure(result.labels, result.classes, regions, result.note)
    truth = np.bincount(structure_label_map(sitk.GetArrayViewFromImage(regions), result.note, result.classes).ravel(),
                        minlength=256)
    drawn = result.structure_volumes()
    voxel_cc = float(np.prod(regions.GetSpacing())) / 1000.0
    return [{"name": name, "dice": round(d, 4), "volume_cc": round(drawn[name], 1),
             "truth_volume_cc": round(float(truth[result.classes.index(name) + 1]) * voxel_cc, 1)}
            for name, d in scores.items()]


def _label_colours(labels: np.ndarray, classes) -> np.ndarray:
    """Label image (any shape) -> RGBA with each structure in its table colour (transparent background)."""
    from ..note.structures import segment_color

    rgba = np.zeros(labels.shape + (4,), np.float32)
    for i, name in enumerate(classes):
        rgba[labels == i + 1] = (*segment_color(name), 0.55)
    return rgba


#: The guideline CTV's outline in the figure: a colour no structure of the table fills with (cyan was CTVn_L2's).
GUIDELINE_OUTLINE = "white"


def figure(path: Path, ct: sitk.Image, panels: list[tuple]) -> Path:
    """Axial and coronal views per note: CT, guideline CTV (outline) and prediction (fill: each structure in
    its colour for a per-structure bundle). A panel: (title, truth, mask, Dice[, labels, classes])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..note.structures import segment_color, structure_for

    # Show in radiological convention regardless of storage: resample to RAS-aligned LPS display grid.
    ref = sitk.DICOMOrient(ct, "LPS")
    arr = sitk.GetArrayFromImage(ref).astype(np.float32)  # (z: I->S, y: A->P, x: R->L)
    truths = [sitk.GetArrayFromImage(sitk.DICOMOrient(panel[1], "LPS")) for panel in panels]
    preds = [sitk.GetArrayFromImage(sitk.DICOMOrient(panel[4] if len(panel) > 4 and panel[4] is not None
                                                     else panel[2], "LPS")) for panel in panels]
    union = np.zeros_like(truths[0], bool)
    for t in truths:
        union |= t > 0
    zc = int(np.round(np.argwhere(union)[:, 0].mean())) if union.any() else arr.shape[0] // 2
    yc = int(np.round(np.argwhere(union)[:, 1].mean())) if union.any() else arr.shape[1] // 2
    sx, sy, sz = ref.GetSpacing()
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for col, (panel, t, p) in enumerate(zip(panels, truths, preds)):
        title, d = panel[0], panel[3]
        classes = panel[5] if len(panel) > 5 and panel[4] is not None else None
        for row, (img, tt, pp, aspect) in enumerate((
                (arr[zc], t[zc], p[zc], sy / sx),
                (arr[:, yc][::-1], t[:, yc][::-1], p[:, yc][::-1], sz / sx))):
            ax = axes[row, col]
            ax.imshow(np.clip(img, -400, 400), cmap="gray", aspect=aspect)
            if classes:
                ax.imshow(_label_colours(pp, classes), aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(np.ma.masked_where(pp == 0, pp), cmap="autumn", alpha=0.45, aspect=aspect)
            if tt.any():
                ax.contour(tt, levels=[0.5], colors=GUIDELINE_OUTLINE, linewidths=1.0, linestyles="dashed")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{title}\nDice {d:.2f}", fontsize=9)
        axes[0, col].text(2, 8, "R", color="white", fontsize=9)
        axes[0, col].text(arr.shape[2] - 10, 8, "L", color="white", fontsize=9)
    drawn: dict[str, set[str]] = {}  # table row -> sides drawn, in class order
    for panel, p in zip(panels, preds):
        if len(panel) > 5 and panel[4] is not None:
            for i, n in enumerate(panel[5]):
                if (p == i + 1).any():
                    row, side = structure_for(n)
                    drawn.setdefault(row.name if row else n, set()).add({"left": "L", "right": "R"}.get(side, ""))
    if drawn:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=segment_color(n), label=f"{n} ({', '.join(sorted(s - {''}))})" if s - {""} else n)
                            for n, s in drawn.items()], loc="lower center", ncol=min(7, len(drawn)), fontsize=8,
                   frameon=False)
    fig.suptitle(f"MMContour: same CT, different clinical notes (fill: prediction, dashed {GUIDELINE_OUTLINE}: guideline CTV)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if drawn else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str | Path, bundle: str | Path | None = None, llm: str | None = None,
             device: str = "auto", seed: int = DEMO_SEED, note_text: str = DEMO_NOTE) -> dict:
    from ..model.bundle import BundleError
    from ..model.bundle_info import default_bundle_path
    from ..training.evaluate import clinical_check, region_coverage
    from ..image.fileio import write_json
    from ..image.readwrite import write_image, write_segmentation
    from ..note.targets import ctv_for_note
    from ..inference.contourer import Contourer

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(bundle) if bundle else default_bundle_path()
    if not (bundle / "config.json").exists():
        raise BundleError(f"demo bundle not found at {bundle}; regenerate it with `make demo-bundle` "
                          "(see Resources/Models/README.md)")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    _say(f"making a synthetic breast CT (seed {seed}, never used for training) ...")
    case = demo_case(seed, note_text)
    write_image(case.ct, out / "ct.nii.gz")
    timings["phantom"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(f"loading the model bundle {bundle.name} and its LLM (first run de-quantizes the GGUF, ~20 s) ...")
    contourer = Contourer.from_bundle(bundle, llm=llm, device=device)
    timings["load_model"] = time.perf_counter() - t
    _say(f"  text model: {contourer.text.spec.name} ({contourer.text.spec.kind}), device {contourer.device}")

    notes = []
    for label, note in counterfactual_notes(case.note):
        _say(f"contouring with note [{label}]: '{note.to_prompt()}'")
        result = contourer.contour(case.ct, note)
        truth = ctv_for_note(case.regions, note)
        d = dice(result.mask, truth)  # same grid: the phantom's
        check = clinical_check(region_coverage(result.mask, case.regions), note)
        name = label.replace(" ", "-")
        seg_path = write_segmentation(out / f"ctv_{name}.seg.nrrd", result.segments("both"),
                                      attributes=result.provenance, sides={"CTV": note.side})
        per_structure = structure_dice(result, case.regions)
        notes.append({"label": label, "prompt": result.prompt, "dice": round(d, 4),
                      "volume_cc": round(result.volume_cc, 1),
                      "truth_volume_cc": round(float(sitk.GetArrayViewFromImage(truth).sum())
                                               * float(np.prod(truth.GetSpacing())) / 1000, 1),
                      "regions": {"contoured": check["targeted"], "guideline": check["expected"],
                                  "correct": check["correct"]},
                      "structures": per_structure,
                      "review": {k: v for k, v in result.review.to_dict().items() if k != "measures"},
                      "anatomical_range": {k: result.anatomical_range.get(k) for k in ("applied", "dropped_cc", "reason")
                                           if k in result.anatomical_range},
                      "segmentation": seg_path.name, "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
                      "_panel": (label, truth, result.mask, d, result.labels, result.classes)})
        _say(f"  Dice {d:.3f} vs the guideline CTV for this note; regions {', '.join(check['targeted']) or 'none'}"
             f"{'' if check['correct'] else ' (guideline: ' + ', '.join(check['expected']) + ')'}; "
             f"{result.timings['total']:.1f} s")
        if per_structure:
            _say("  structures: " + ", ".join(f"{r['name']} {r['volume_cc']:.0f} cc (Dice {r['dice']:.2f})"
                                              for r in per_structure))
        if result.review.needs_review:
            _say("  REVIEW: " + "; ".join(r.line() for r in result.review.reasons))

    t = time.perf_counter()
    figure(out / "demo.png", case.ct, [n.pop("_panel") for n in notes])
    timings["figure"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    summary = {"bundle": str(bundle), "bundle_id": contourer.bundle.bundle_id, "llm": contourer.text.spec.name,
               "llm_fingerprint": contourer.text.fingerprint, "device": str(contourer.device),
               "phantom_seed": seed, "llm_calls": contourer.llm_calls, "notes": notes,
               "timings_s": {k: round(v, 2) for k, v in timings.items()},
               "outputs": ["ct.nii.gz", "demo.png", "summary.json"] + [n["segmentation"] for n in notes]}
    write_json(out / "summary.json", summary)
    _say(f"done in {timings['total']:.1f} s -> {out}/summary.json, {out}/demo.png")
    return summary
