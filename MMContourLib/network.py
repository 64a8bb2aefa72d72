"""The text-conditioned residual 3D U-Net (paper Table S1) built from MONAI blocks.

Encoder: five residual levels with channels f, f, 2f, 4f, 8f (f = 48 in the paper), stride 2
between levels. Decoder: transposed conv x2, skip concatenation, residual block. When a text
embedding is used, a two-way alignment block updates the features of every level before the
decoder reads them. The encoder never sees the text, so its features can be reused when only
the note changes (``encode`` / ``decode``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from .alignment import TextImageAlignment


@dataclass(frozen=True)
class NetworkConfig:
    feature_size: int = 48
    in_channels: int = 1
    out_channels: int = 2
    text_dim: int | None = None  # None: vision-only
    align_depth: int = 2
    align_heads: int = 8
    norm: str = "instance"

    @property
    def channels(self) -> tuple[int, ...]:
        f = self.feature_size
        return (f, f, 2 * f, 4 * f, 8 * f)

    def to_dict(self) -> dict:
        return asdict(self)


class TextConditionedUNet(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        spatial, norm = 3, config.norm
        self.encoders = nn.ModuleList(
            [UnetrBasicBlock(spatial, config.in_channels, ch[0], 3, 1, norm, res_block=True)]
            + [UnetrBasicBlock(spatial, ch[i - 1], ch[i], 3, 2, norm, res_block=True) for i in range(1, 5)])
        self.decoders = nn.ModuleList(
            UnetrUpBlock(spatial, ch[i + 1], ch[i], 3, 2, norm, res_block=True) for i in reversed(range(4)))
        self.out = UnetOutBlock(spatial, ch[0], config.out_channels)
        if config.text_dim:
            f = config.feature_size
            self.align = nn.ModuleList(
                TextImageAlignment(config.text_dim, c, config.align_depth, _heads_for(c, config.align_heads),
                                   mlp_dim=f * 2 ** level)
                for level, c in enumerate(ch))
        else:
            self.align = None

    @property
    def downsample_factor(self) -> int:
        return 16

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 1, X, Y, Z) with X, Y, Z multiples of 16 -> features of the five levels."""
        feats = []
        for enc in self.encoders:
            x = enc(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], g: torch.Tensor | None = None) -> torch.Tensor:
        """feats from ``encode``; g: (B, N, D) note embedding or None (vision-only) -> logits (B, 2, X, Y, Z)."""
        if self.align is not None:
            if g is None:
                raise ValueError("this network was trained with a text encoder: pass the note embedding")
            if g.shape[0] != feats[0].shape[0]:
                g = g.expand(feats[0].shape[0], *g.shape[1:])
            feats = [align(f, g) for align, f in zip(self.align, feats)]
        x = feats[-1]
        for dec, skip in zip(self.decoders, reversed(feats[:-1])):
            x = dec(x, skip)
        return self.out(x)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x), g)


def _heads_for(channels: int, wanted: int) -> int:
    """The paper's 8 heads at full size; fewer where a small CPU model's (halved) width cannot split 8 ways."""
    return next(h for h in range(wanted, 0, -1) if (channels // 2) % h == 0)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
