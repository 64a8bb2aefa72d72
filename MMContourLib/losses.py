"""Training loss: Dice + cross-entropy (weights 1, 1, as in the paper), optionally with more weight
on chosen regions.

Where a note changes the target, it usually changes a small part of it: the nodal levels of a
node-positive case (axilla, supraclavicular, internal mammary: 10-100 cc each) against a
300-900 cc breast. With plain Dice + CE those voxels carry a few per cent of the loss, and a model
can reach a good Dice while ignoring the N stage. ``region_weight`` w gives every voxel in the
emphasised regions weight 1 + w * (fraction of the voxel inside them), in both terms: a weighted
cross-entropy (normalised by the sum of weights) and a weighted soft Dice (weights multiply the
intersection and both volumes). The emphasised voxels are weighted in node-negative cases too,
where the target there is background, so the model is pushed to *decide* them from the note.

With w = 0 (or no emphasis map) this is exactly MONAI's ``DiceCELoss(to_onehot_y=True,
softmax=True)``; ``Testing/test_losses.py`` checks that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr / smooth_dr


def weighted_dice_ce(logits: torch.Tensor, label: torch.Tensor, emphasis: torch.Tensor | None = None,
                     region_weight: float = 0.0) -> torch.Tensor:
    """``logits`` (B, C, X, Y, Z), ``label`` (B, 1, X, Y, Z) class indices, ``emphasis`` (B, 1, X, Y, Z) in [0, 1].

    Dice: per sample and class (background included), mean over both; CE: weighted mean over voxels.
    """
    num_classes = logits.shape[1]
    target = label[:, 0].long()
    if emphasis is None or region_weight == 0:
        weight = torch.ones_like(logits[:, :1])
    else:
        weight = 1.0 + float(region_weight) * emphasis.to(logits.dtype)
    ce = F.cross_entropy(logits, target, reduction="none")  # (B, X, Y, Z)
    w = weight[:, 0]
    ce = (ce * w).sum() / w.sum()
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, logits.ndim))
    intersection = (prob * onehot * weight).sum(dims)
    denominator = ((prob + onehot) * weight).sum(dims)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    return dice.mean() + ce


__all__ = ["weighted_dice_ce"]
