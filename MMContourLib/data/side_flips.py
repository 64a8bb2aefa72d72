"""Side-flipped training cases (``mmcontour side-flips``): one-sided training cases of a manifest whose
note names the other side, each with the CTV that flipped note asks for on the same CT.

Why: in a real archive the note and the CT always agree, so a model learns that a visible mastectomy
marks the side to treat. Told "left side" on a CT that shows a right mastectomy, v13 still drew half of
the operated right chest wall (docs/results.md, side flip). Cases in which only the note names the side
teach that the note decides it.

The flipped CTV is built from the case's regions map (``note.targets.ctv_for_note``), which must label
both sides: phantoms do; a hospital export, which contours only the treated side, cannot be flipped.
The new rows point at the original CT and regions files; only the CTV is written."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..note.clinical import SIDES, other_side
from .manifest import ManifestError, note_for, read_manifest, write_manifest

FLIP_SUFFIX = "-flip"


def write_side_flips(manifest, out_dir, share: float, seed: int = 0, split: str = "train") -> dict:
    """Pick ``share`` of the one-sided cases of ``split`` (seeded), write DIR/cases/<id>-flip_ctv.nii.gz
    and DIR/manifest.csv (the picked cases with the other side in their note, split ``split``, the CT and
    regions of the original). Returns a summary: cases written, how many of them mastectomies."""
    import SimpleITK as sitk

    from ..image.readwrite import read_image, write_image
    from ..note.targets import ctv_for_note

    if not 0.0 < float(share) <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    out = Path(out_dir)
    target = out / "manifest.csv"
    if Path(manifest).resolve() == target.resolve():
        raise ValueError(f"{target} is the manifest being flipped; write the flipped cases to another folder")
    rows = read_manifest(manifest, split=split, check=True)
    one_sided = [row for row in rows if note_for(row).side in SIDES]
    if not one_sided:
        raise ManifestError(manifest, f"has no one-sided case in split {split!r} to flip")
    missing = [row["case_id"] for row in one_sided if not row.get("regions")]
    if missing:
        raise ManifestError(manifest, f"{len(missing)} case(s) have no regions map (e.g. {missing[0]}): the flipped "
                                      "CTV is built from the regions of both sides, which only phantoms label")
    rng = np.random.default_rng([int(seed), 7])
    count = max(1, int(round(float(share) * len(one_sided))))
    picked = sorted(rng.choice(len(one_sided), size=count, replace=False).tolist())
    (out / "cases").mkdir(parents=True, exist_ok=True)
    relative = lambda p: os.path.relpath(Path(p).resolve(), out.resolve())  # the new manifest's paths
    written, mastectomies = [], 0
    for i in picked:
        row = one_sided[i]
        note = note_for(row)
        flipped = note.replace(side=other_side(note.side))
        regions = read_image(row["regions"])
        ctv = ctv_for_note(regions, flipped)
        if not sitk.GetArrayViewFromImage(ctv).any():
            raise ManifestError(manifest, f"the regions map of {row['case_id']} has nothing of the {flipped.side} "
                                          "side: only a map labelling both sides can be flipped")
        case_id = row["case_id"] + FLIP_SUFFIX
        ctv_file = f"cases/{case_id}_ctv.nii.gz"
        write_image(ctv, out / ctv_file)
        written.append({"case_id": case_id, "ct": relative(row["ct"]), "ctv": ctv_file, "split": split,
                        **flipped.to_fields(), "regions": relative(row["regions"])})
        mastectomies += note.sides[0].surgery == "mastectomy"
    write_manifest(target, written)
    return {"manifest": str(target), "cases": len(written), "one_sided": len(one_sided),
            "mastectomies": mastectomies, "from": str(manifest)}


__all__ = ["FLIP_SUFFIX", "write_side_flips"]
