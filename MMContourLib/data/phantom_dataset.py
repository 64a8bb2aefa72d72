"""Phantom datasets on disk (``mmcontour phantom``): ``write_dataset`` writes ``n`` cases of
``phantom.generate_case`` (CT, CTV, sub-region labels), ``manifest.csv`` and ``phantom.json`` into a
folder, with seeded per-case seeds and splits balanced by target kind."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..image.fileio import write_text as _write_text
from ..note.clinical import ClinicalNote
from ..note.targets import REGION_LABELS, REGION_PARTS
from .manifest import write_manifest
from .phantom import PhantomConfig, generate_case, sample_note

SPLITS = ("train", "val", "test")


def case_seed(seed: int, index: int) -> int:
    """The generate_case seed of case ``index`` of a dataset written with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def target_kind(note: ClinicalNote) -> str:
    """'breast', 'breast+RNI', 'chestwall' or 'chestwall+RNI' per side, ';'-joined for bilateral notes."""
    return ";".join(("breast" if s.surgery == "bcs" else "chestwall") + ("+RNI" if s.node_positive else "")
                    for s in note.sides)


def _assign_splits(notes: list[ClinicalNote], fractions, seed: int) -> list[str]:
    """Stratified by target kind: cases sorted by kind take splits from a low-discrepancy sequence."""
    frac = np.asarray(fractions, float)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test), got {fractions}")
    frac = frac / frac.sum()
    rng = np.random.default_rng([int(seed), 99])
    keys = rng.random(len(notes))
    order = sorted(range(len(notes)), key=lambda i: (target_kind(notes[i]), keys[i]))
    start = rng.random()
    out = [""] * len(notes)
    for j, i in enumerate(order):
        u = (start + j * 0.6180339887498949) % 1.0
        out[i] = SPLITS[min(int(np.searchsorted(np.cumsum(frac), u, side="right")), 2)]
    for k, name in enumerate(SPLITS):  # every split asked for gets at least one case when there are enough
        if frac[k] > 0 and name not in out and len(notes) >= int((frac > 0).sum()):
            donor = max(SPLITS, key=out.count)
            out[max(i for i in order if out[i] == donor)] = name
    return out


def _is_phantom_folder(out: Path) -> bool:
    try:
        return json.loads((out / "phantom.json").read_text()).get("generator") == "MMContourLib.data.phantom"
    except (OSError, ValueError, AttributeError):
        return False


def write_dataset(n: int, out_dir, seed: int = 0, config: PhantomConfig | None = None,
                  split_fractions=(0.6, 0.2, 0.2), progress: bool = True) -> Path:
    """Write ``n`` cases (cases/<id>_ct.nii.gz, _ctv.nii.gz, _regions.nii.gz), ``manifest.csv`` and
    ``phantom.json`` (config and per-case facts such as what the CT shows). Returns the manifest path.

    A folder holding a manifest.csv that this generator did not write is refused, so nothing the user
    made is overwritten; a phantom folder is rewritten in place (files of its old cases are removed)."""
    from tqdm import tqdm

    from ..image.readwrite import write_image

    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    cfg = config or PhantomConfig()
    out = Path(out_dir)
    manifest, marker = out / "manifest.csv", out / "phantom.json"
    previous = {}
    if out.exists() and _is_phantom_folder(out):
        previous = json.loads(marker.read_text()).get("cases", {})
    elif manifest.exists():
        raise FileExistsError(f"{manifest} exists and was not written by the phantom generator; "
                              "choose an empty or new --out folder")
    seeds = [case_seed(seed, i) for i in range(int(n))]
    notes = [sample_note(s, cfg) for s in seeds]
    splits = _assign_splits(notes, split_fractions, seed)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    meta = {"generator": "MMContourLib.data.phantom", "seed": int(seed), "n": int(n), "config": cfg.to_dict(),
            "region_labels": REGION_LABELS, "region_parts": REGION_PARTS,  # the axilla is written as its levels I-III
            "cases": previous, "complete": False}
    _write_text(marker, json.dumps(meta, indent=1, default=str))  # claims the folder before any case is written
    rows, infos = [], {}
    for i in tqdm(range(int(n)), desc="phantom", unit="case", disable=not progress, file=sys.stderr):
        case = generate_case(seeds[i], cfg, note=notes[i], case_id=f"p{seed}-{i:04d}")
        files = {}
        for key, image in (("ct", case.ct), ("ctv", case.ctv), ("regions", case.regions)):
            files[key] = f"cases/{case.case_id}_{key}.nii.gz"
            write_image(image, out / files[key])
        rows.append({"case_id": case.case_id, **files, "split": splits[i], **case.note.to_fields()})
        infos[case.case_id] = {**case.info, "split": splits[i], "target": target_kind(case.note)}
    for old in set(previous) - set(infos):
        for key in ("ct", "ctv", "regions"):
            (out / "cases" / f"{old}_{key}.nii.gz").unlink(missing_ok=True)
    write_manifest(manifest, rows)  # with the regions column
    _write_text(marker, json.dumps({**meta, "cases": infos, "complete": True}, indent=1, default=str))
    return manifest


def summarize(manifest: "str | Path") -> dict:
    """Counts a phantom folder by split, target kind and how many cases show the treated side: any
    treated side a mastectomy or a conserved breast with a sign of surgery (``treatment_visible``),
    and of the conserved breasts the share with a sign, and with one a 5 mm grid keeps (not clips only)."""
    manifest = Path(manifest)
    meta = json.loads((manifest.parent / "phantom.json").read_text())
    cases = meta["cases"].values()
    count = lambda key: {k: sum(1 for c in cases if c[key] == k) for k in sorted({c[key] for c in cases})}
    conserved = [(c, s) for c in cases for s in c["sides"] if c["sides"][s]["breast"] == "conserved"]
    share = lambda key: round(sum(bool(c.get(key, {}).get(s)) for c, s in conserved) / len(conserved), 3) \
        if conserved else None
    return {"manifest": str(manifest), "n": meta["n"], "seed": meta["seed"], "splits": count("split"),
            "targets": count("target"), "orientations": count("orientation"),
            "treatment_visible": sum(1 for c in cases if any(c["treatment_visible"][s] for s in c["sides"]
                                                          if c["sides"][s]["breast"] != "intact")),
            "conserved_breasts": len(conserved), "conserved_visible": share("treatment_visible"),
            "conserved_visible_5mm": share("treatment_visible_5mm"),
            "size": next(iter(cases))["size"], "spacing": next(iter(cases))["spacing"]}


__all__ = ["SPLITS", "case_seed", "target_kind", "write_dataset", "summarize"]
