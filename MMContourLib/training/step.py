"""One training step, the one ``mmcontour train``, ``mmcontour bench`` and the scale-out bench run.

A batch of patches and their notes -> the text encoder on the batch's *unique* prompts, with
gradients into the prompt vectors (the LLM stays frozen) -> U-Net under autocast -> Dice + CE in
fp32 (``losses.weighted_dice_ce``) -> backward (loss-scaled when the GPU computes in fp16) ->
AdamW step -> learning-rate schedule step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..model.device import autocast_context, autocast_dtype
from .losses import weighted_dice_ce

if TYPE_CHECKING:
    from ..model.network import TextConditionedUNet
    from ..model.text import TextEncoderLike


class TrainableModel(nn.Module):
    """The modules that learn: the U-Net and the text encoder's prompt vectors (its LLM is not a
    submodule, so DDP neither broadcasts nor synchronises it)."""

    def __init__(self, network: TextConditionedUNet, text: TextEncoderLike):
        super().__init__()
        self.network = network
        self.text = text

    def embed(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """(B, N, D) for B prompts; the text encoder runs once per distinct prompt."""
        if self.text.dim is None:
            return None
        unique = list(dict.fromkeys(prompts))
        g = self.text(unique)
        return g[torch.tensor([unique.index(p) for p in prompts], device=g.device)]

    def forward(self, image: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        g = self.embed(prompts)
        return self.network(image, None if g is None else g.to(image.device))


def adamw(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-5) -> torch.optim.AdamW:
    """AdamW over the parameters that learn (the paper's optimiser)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


class TrainStep:
    """``step(image, label, prompts, ...)`` -> the batch's loss, after one optimiser step.

    ``model``: a ``TrainableModel`` (or its DistributedDataParallel wrapper); ``precision``: the
    U-Net's autocast (``model.device``; "fp32" for none). ``scaler`` (fp16 loss scaling) is part of
    what a checkpoint saves.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 scheduler=None, precision: str = "auto", region_weight: float = 0.0, balance: float = 0.0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.precision, self.region_weight, self.balance = device, precision, region_weight, balance
        self.scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, prompts: Sequence[str],
                 emphasis: torch.Tensor | None = None, soft: torch.Tensor | None = None,
                 classes: torch.Tensor | None = None) -> float:
        with autocast_context(self.device, self.precision):
            logits = self.model(image, prompts)
        loss = weighted_dice_ce(logits.float(), label, emphasis, self.region_weight, soft, classes, self.balance)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach())
