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

``soft``: partial-volume targets. A CTV resampled to a coarse model grid covers a border voxel
only in part; thresholding that fraction at 0.5 thins structures a few voxels wide (a 15 mm
internal mammary strip keeps 53-73 % of its volume through a 5 mm grid and back). With ``soft``
(the fraction of each voxel inside the CTV) the targets are (1 - s, s) in both terms, so the
model learns the fraction, which the exact inverse (probabilities resampled, then thresholded)
turns back into the CT-grid contour. Hard 0/1 targets give the same loss as without ``soft``.

Per-structure networks (background + one output per structure): the loss on the union of the
structure outputs plus the multi-class loss where a voxel's structure is known (``weighted_dice_ce``),
so an archive can mix cases with structures and cases with only one CTV, plus the cross-entropy of which
structure each known CTV voxel is, averaged over the CTV (``_structure_ce``): without it the structure
decision is a few per cent of the loss and a run can leave one structure holding every voxel (v4,
docs/results.md).

``balance`` b > 0 adds b times a class-balanced cross-entropy (``_balanced_ce``): per sample and class
present (background included), the mean of -log p over that class's voxels, averaged over those pairs.
A small level the model still takes for background (the internal mammary nodes: 60-220 voxels on a
5 mm grid, p ~ 0.01) gets almost no gradient from the other terms: its Dice gradient passes through
p (1 - p) and its voxels are a few hundredths of a per cent of the patch-averaged cross-entropy. In this
term it weighs as much as the breast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..note.targets import UNKNOWN_CLASS

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr / smooth_dr


def weighted_dice_ce(logits: torch.Tensor, label: torch.Tensor, emphasis: torch.Tensor | None = None,
                     region_weight: float = 0.0, soft: torch.Tensor | None = None,
                     classes: torch.Tensor | None = None, balance: float = 0.0) -> torch.Tensor:
    """``logits`` (B, C, X, Y, Z), ``label`` (B, 1, X, Y, Z) 0/1 (the whole CTV; without ``soft`` and ``classes``:
    class indices, the plain multi-class loss), ``emphasis`` (B, 1, X, Y, Z) in
    [0, 1], ``soft`` (B, 1, X, Y, Z) CTV fractions in [0, 1] replacing ``label`` as the target.

    C = 2 (background, CTV): Dice per sample and class (background included), mean over both; CE:
    weighted mean over voxels. C > 2 (background + one class per structure): ``classes`` (B, 1, X, Y, Z)
    holds each voxel's structure (0 background, ``UNKNOWN_CLASS`` = 255 where the CTV's structure is not
    known, e.g. a case with only the union): the loss is the same Dice + CE on the union of the
    structure outputs (1 - p(background)) against the CTV, for every case, plus Dice + CE over all C
    classes where the structure is known (weight 0 at unknown voxels; a union-only case still teaches the
    structures where its background is), plus the structure cross-entropy over the known CTV voxels.
    """
    num_classes = logits.shape[1]
    if emphasis is None or region_weight == 0:
        weight = torch.ones_like(logits[:, :1])
    else:
        weight = 1.0 + float(region_weight) * emphasis.to(logits.dtype)
    log_prob = torch.log_softmax(logits, dim=1)
    if classes is None and soft is None:  # class indices: MONAI's DiceCELoss for any number of classes
        return _dice_ce(log_prob, F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).to(logits.dtype), weight)
    s = (soft if soft is not None else label).to(logits.dtype).clamp(0, 1)
    if num_classes == 2:
        return _dice_ce(log_prob, torch.cat([1 - s, s], dim=1), weight)
    if classes is None:
        raise ValueError(f"soft targets need 2 classes (background, CTV) or the structure of each voxel; the "
                         f"logits have {num_classes} classes")
    # log(1 - p_bg) = logsumexp of the structure logits - logsumexp of all
    log_fg = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - torch.logsumexp(logits, dim=1, keepdim=True)
    union = _dice_ce(torch.cat([log_prob[:, :1], log_fg], dim=1), torch.cat([1 - s, s], dim=1), weight)
    c = classes[:, 0].long()
    known = c != UNKNOWN_CLASS
    onehot = F.one_hot(torch.where(known, c, 0).clamp(0, num_classes - 1), num_classes).movedim(-1, 1).to(logits.dtype)
    target = torch.cat([1 - s, s * onehot[:, 1:]], dim=1)
    known_weight = weight * known[:, None].to(logits.dtype)
    joint = _dice_ce(log_prob, target, known_weight, present_only=True)
    loss = union + joint + _structure_ce(logits[:, 1:], onehot[:, 1:], known_weight * s)
    if balance:
        loss = loss + float(balance) * _balanced_ce(log_prob, target, known_weight)
    return loss


def _balanced_ce(log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross-entropy: per (sample, class) with target mass, -log p_class averaged over that
    class's voxels (each voxel counted by its target fraction times ``weight``), then the mean over those
    pairs: every class present weighs the same, whatever its size."""
    dims = tuple(range(2, log_prob.ndim))
    mass = (target * weight).sum(dims)  # (B, C)
    ce = -(target * weight * log_prob).sum(dims)
    present = mass > 0
    if not present.any():
        return log_prob.new_zeros(())
    return (ce[present] / mass[present]).mean()


def _structure_ce(structure_logits: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of *which* structure a CTV voxel belongs to (softmax over the structure outputs only,
    background left out), averaged over the CTV voxels whose structure is known (``weight``: their weight
    times their CTV fraction, 0 elsewhere).

    The joint terms cannot teach this alone: the CTV is 1-2 % of a patch, so their cross-entropy, a mean
    over the whole patch, gives the structure decision a few per cent of the loss, and once one structure
    takes a region its rivals' probabilities (and with them their Dice gradients) vanish. Averaged over
    the CTV, the decision weighs as much as the union's, whatever the CTV's size."""
    if weight.sum() <= 0:
        return structure_logits.new_zeros(())
    ce = -(onehot * torch.log_softmax(structure_logits, dim=1)).sum(1)
    w = weight[:, 0]
    return (ce * w).sum() / w.sum()


def _dice_ce(log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
             present_only: bool = False) -> torch.Tensor:
    """Weighted cross-entropy (normalised by the weights' sum) + weighted soft Dice (per sample and class,
    background included, mean); ``target`` (B, C, ...) sums to 1 over C, ``weight`` (B, 1, ...).
    ``present_only``: the Dice mean is over the (sample, class) pairs the target has: with 14 structures
    most are absent from a patch, and their Dice (1 with almost no gradient) would only dilute the
    present ones' (the cross-entropy still keeps absent classes out)."""
    ce = -(target * log_prob).sum(1)  # (B, X, Y, Z): the usual cross-entropy for one-hot targets
    w = weight[:, 0]
    ce = (ce * w).sum() / w.sum().clamp_min(SMOOTH)
    prob = log_prob.exp()
    dims = tuple(range(2, log_prob.ndim))
    intersection = (prob * target * weight).sum(dims)
    denominator = ((prob + target) * weight).sum(dims)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    if present_only:
        present = ((target * weight).sum(dims) > 0).to(dice.dtype)
        return (dice * present).sum() / present.sum().clamp_min(1.0) + ce
    return dice.mean() + ce


__all__ = ["weighted_dice_ce"]
