"""The text-conditioned residual 3D U-Net (paper Table S1) built from MONAI blocks.

Encoder: five residual levels with channels f, f, 2f, 4f, 8f (f = 48 in the paper), stride 2
between levels. Decoder: transposed conv x2, skip concatenation, residual block. When a text
embedding is used, a two-way alignment block updates the features of every level before the
decoder reads them. The encoder never sees the text, so its features can be reused when only
the note changes (``encode`` / ``decode``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from .alignment import EmbeddingStandardizer, TextImageAlignment


@dataclass(frozen=True)
class NetworkConfig:
    """``structures``: the names of the foreground classes (``note.structures.structure_classes``), one
    output each after the background; empty: one foreground class, the whole CTV (bundles before
    per-structure output). ``out_channels`` is 1 + the number of foreground classes."""
    feature_size: int = 48
    in_channels: int = 1
    out_channels: int = 2
    text_dim: int | None = None  # None: vision-only
    align_depth: int = 2
    align_heads: int = 8
    norm: str = "instance"
    structures: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "structures", tuple(str(s) for s in self.structures))
        if self.structures and self.out_channels != 1 + len(self.structures):
            if self.out_channels != 2:  # 2 is the default: follow the structures
                raise ValueError(f"out_channels {self.out_channels} does not fit {len(self.structures)} structures "
                                 f"(background + one per structure = {1 + len(self.structures)})")
            object.__setattr__(self, "out_channels", 1 + len(self.structures))
        if not self.structures and self.out_channels != 2:
            raise ValueError(f"out_channels {self.out_channels}: a network without a structure list has 2 "
                             "(background, CTV)")

    @property
    def classes(self) -> tuple[str, ...]:
        """Names of the foreground outputs: the structures, or ("CTV",)."""
        return self.structures or ("CTV",)

    @property
    def channels(self) -> tuple[int, ...]:
        f = self.feature_size
        return (f, f, 2 * f, 4 * f, 8 * f)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["structures"] = list(self.structures)
        return d


class TextConditionedUNet(nn.Module):
    """``fused_alignment``: inference runs the alignment in its fused form (same result, no per-voxel
    q/k/v tensors; never while gradients are recorded). ``activation_checkpointing``: training
    recomputes each block's activations in the backward pass instead of keeping them. Neither
    changes the weights, so neither is part of ``NetworkConfig`` (nor of a bundle)."""

    def __init__(self, config: NetworkConfig, *, fused_alignment: bool = True, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        ch = config.channels

        def encoder_level(in_channels: int, out_channels: int, stride: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, kernel_size=3,
                                   stride=stride, norm_name=config.norm, res_block=True)

        self.encoders = nn.ModuleList([encoder_level(config.in_channels, ch[0], stride=1)]
                                      + [encoder_level(ch[i - 1], ch[i], stride=2) for i in range(1, 5)])
        self.decoders = nn.ModuleList(
            UnetrUpBlock(spatial_dims=3, in_channels=ch[i + 1], out_channels=ch[i], kernel_size=3,
                         upsample_kernel_size=2, norm_name=config.norm, res_block=True)
            for i in reversed(range(4)))
        self.out = UnetOutBlock(spatial_dims=3, in_channels=ch[0], out_channels=config.out_channels)
        if config.out_channels > 2:
            # K structures at even odds would start the whole CTV at p = K / (K + 1) everywhere; start the
            # background at the odds two classes have, so training starts from "nothing contoured" as before
            with torch.no_grad():
                self.out.conv.conv.bias[0] += math.log(config.out_channels - 1)
        if config.text_dim:
            self.text_norm = EmbeddingStandardizer(config.text_dim)
            f = config.feature_size
            self.align = nn.ModuleList(
                TextImageAlignment(config.text_dim, c, config.align_depth, _heads_for(c, config.align_heads),
                                   mlp_dim=f * 2 ** level)
                for level, c in enumerate(ch))
        else:
            self.align = None
        self.fused_alignment = fused_alignment
        self.activation_checkpointing = activation_checkpointing

    @property
    def downsample_factor(self) -> int:
        return 16

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 1, X, Y, Z) with X, Y, Z multiples of 16 -> features of the five levels."""
        feats = []
        for enc in self.encoders:
            x = self._run(enc, x)
            feats.append(x)
        return feats

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def decode(self, feats: list[torch.Tensor], g: torch.Tensor | None = None) -> torch.Tensor:
        """feats from ``encode``; g: (B, N, D) note embedding or None (vision-only) -> logits (B, out_channels, X, Y, Z)."""
        if self.align is not None:
            if g is None:
                raise ValueError("this network was trained with a text encoder: pass the note embedding")
            if g.shape[0] != feats[0].shape[0]:
                g = g.expand(feats[0].shape[0], *g.shape[1:])
            g = self.text_norm(g)
            fused = self.fused_alignment and not torch.is_grad_enabled()
            feats = [fused_alignment(align, f, g) if fused else self._run(align, f, g)
                     for align, f in zip(self.align, feats)]
        x = feats[-1]
        for dec, skip in zip(self.decoders, reversed(feats[:-1])):
            x = self._run(dec, x, skip)
        return self.out(x)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x), g)


def fused_alignment(align: TextImageAlignment, features: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``align(features, g)`` computed without per-voxel query/key/value tensors (inference).

    With only N (= 2) text tokens, every attention that touches the image folds into two thin
    matmuls over the voxels: scores = image @ U with U = W_k^T q (text->image) or W_q^T k
    (image->text), and the attention output followed by ``out_proj`` is P @ M with M the
    per-head, per-token rows W_o v; for N = 2 the softmax is a sigmoid of one score per head, and
    the residual and bias ride in the same matmul. Same arithmetic up to float rounding, a fraction
    of the memory traffic (and no L x C query/key/value tensors on the GPU).
    """
    b, c = features.shape[:2]
    spatial = features.shape[2:]
    image = features.flatten(2).transpose(1, 2)  # (B, L, C); a free view for channels-last input
    text = align.project(g.to(image.dtype))
    pe = align.position(tuple(spatial)).to(image.dtype)
    for block in align.blocks:
        text = block.norm1(text + block.self_attn(text, text, text))
        text = block.norm2(text + _text_to_image(block.text_to_image, text, image, image + pe))
        text = block.norm3(text + block.mlp(text))
        image = block.norm4(_image_to_text(block.image_to_text, image, text, image + pe))
    out = image.reshape(b, *spatial, c).permute(0, 4, 1, 2, 3)  # channels-last in memory
    # the decoder's convolutions are slow on a mix of layouts: hand back the layout that came in
    return out if features.is_contiguous(memory_format=torch.channels_last_3d) else out.contiguous()


def _head_weights(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inner, C) weight and (inner,) bias -> (H, d, C) and (H, d)."""
    inner = linear.weight.shape[0]
    return linear.weight.reshape(heads, inner // heads, -1), linear.bias.reshape(heads, inner // heads)


def _text_to_image(attn, text: torch.Tensor, image: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Text queries (B, N, C) over image keys (image + position, B, L, C) and values (image) -> (B, N, C)."""
    h = attn.heads
    b, n, _ = text.shape
    wk, _ = _head_weights(attn.k_proj, h)  # the key bias shifts all scores of a query alike: no effect
    wv, bv = _head_weights(attn.v_proj, h)
    q = attn.q_proj(text).reshape(b, n, h, -1)  # (B, N, H, d)
    scale = q.shape[-1] ** -0.5
    u = torch.einsum("bnhd,hdc->bhnc", q, wk.to(q.dtype)).reshape(b, h * n, -1) * scale  # (B, HN, C)
    scores = torch.matmul(u.to(keys.dtype), keys.transpose(1, 2))  # (B, HN, L): softmax over contiguous rows
    p = torch.softmax(scores.float(), dim=-1).to(image.dtype)
    z = torch.matmul(p, image).reshape(b, h, n, -1)  # (B, H, N, C)
    out = torch.einsum("bhnc,hdc->bnhd", z, wv.to(z.dtype)) + bv.to(z.dtype)
    return attn.out_proj(out.reshape(b, n, -1))


def _image_to_text(attn, image: torch.Tensor, text: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``image + attn(queries, text, text)``: image queries (image + position, B, L, C) over text keys/values."""
    h = attn.heads
    b, n, _ = text.shape
    wq, bq = _head_weights(attn.q_proj, h)
    k = attn.k_proj(text).reshape(b, n, h, -1)  # (B, N, H, d)
    v = attn.v_proj(text).reshape(b, n, h, -1)
    scale = k.shape[-1] ** -0.5
    u = torch.einsum("hdc,bnhd->bhnc", wq.to(k.dtype), k) * scale  # score of voxel x for (h, n): u . x + c
    c = torch.einsum("hd,bnhd->bhn", bq.to(k.dtype), k) * scale
    wo = attn.out_proj.weight.reshape(-1, h, v.shape[-1])  # (C, H, d)
    m = torch.einsum("bnhd,chd->bhnc", v, wo.to(v.dtype))  # what token n of head h adds to a voxel
    bias = attn.out_proj.bias.to(m.dtype)
    if n == 2:  # softmax over two tokens is a sigmoid of the difference: one score per head, not two
        u, c, base = u[:, :, 0] - u[:, :, 1], c[:, :, 0] - c[:, :, 1], m[:, :, 1].sum(1) + bias
        m = m[:, :, 0] - m[:, :, 1]  # (B, H, C)
        p = torch.sigmoid(torch.baddbmm(c[:, None].to(image.dtype), queries, u.transpose(1, 2).to(image.dtype)))
    else:
        scores = torch.baddbmm(c.reshape(b, 1, h * n).to(image.dtype), queries,
                               u.reshape(b, h * n, -1).transpose(1, 2).to(image.dtype))
        p = torch.softmax(scores.reshape(b, -1, h, n).float(), -1).reshape(b, -1, h * n)
        m, base = m.reshape(b, h * n, -1), bias.expand(b, -1)
    # the constant row rides along as one more column of ones, so one matmul adds it and the residual
    p = torch.cat([p.to(image.dtype), p.new_ones(*p.shape[:2], 1, dtype=image.dtype)], 2)
    return torch.baddbmm(image, p, torch.cat([m, base[:, None]], 1).to(image.dtype))


def _heads_for(channels: int, wanted: int) -> int:
    """The paper's 8 heads at full size; fewer where a small CPU model's (halved) width cannot split 8 ways."""
    return next(h for h in range(wanted, 0, -1) if (channels // 2) % h == 0)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
