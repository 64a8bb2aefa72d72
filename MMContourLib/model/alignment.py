"""SAM-style two-way attention that aligns clinical-note tokens with image tokens.

Follows segment-anything's ``TwoWayTransformer``: the sparse tokens (here the N context
embeddings of the note) self-attend, attend to the image, pass an MLP, and the image tokens
then attend back to the updated text tokens. The updated image tokens replace the skip features.
As in SAM, a dense positional encoding is added to the image tokens wherever they are matched
against text (keys of text->image, queries of image->text): without it, mirror-symmetric anatomy
gives the left and the right breast the same features and the note's side cannot select one.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of the internal width (SAM's ``downsample_rate``)."""

    def __init__(self, dim: int, heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, Nq, C), k/v: (B, Nk, C) -> (B, Nq, C)."""
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class EmbeddingStandardizer(nn.Module):
    """Per-dimension standardisation of the note embedding g with running statistics.

    An LLM's final hidden states share a large common component (and a few massive dimensions);
    notes differ in small variations around it (cosine ~0.98 between "left side" and "right side").
    Standardising each dimension over the notes seen in training makes those variations the
    signal the alignment projections start from. The statistics are buffers (saved in a bundle)
    and are only updated in training; the normalisation itself always uses the running values,
    so it is a fixed affine map for any batch size (one note, one process of a DDP run).
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5, floor: float = 1e-2):
        super().__init__()
        self.momentum, self.eps, self.floor = momentum, eps, floor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))

    @torch.no_grad()
    def reset_from(self, g: torch.Tensor) -> None:
        """Initialise the statistics from embeddings of many notes, g: (..., D)."""
        flat = g.detach().reshape(-1, g.shape[-1]).float()
        self.mean.copy_(flat.mean(0))
        var = flat.var(0, unbiased=False)
        self.var.copy_(var.clamp_min(self.floor * float(var.mean()) + self.eps))

    @torch.no_grad()
    def _update(self, g: torch.Tensor) -> None:
        flat = g.detach().reshape(-1, g.shape[-1]).float()
        stats = torch.cat([flat.sum(0), ((flat - self.mean) ** 2).sum(0), flat.new_tensor([flat.shape[0]])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # every process applies the same update
        d = self.mean.numel()
        n = stats[-1]
        self.mean.lerp_(stats[:d] / n, self.momentum)
        var = stats[d:2 * d] / n
        # a dimension in which the notes seen so far agree must not be blown up by a tiny variance
        self.var.lerp_(var.clamp_min(self.floor * float(var.mean()) + self.eps), self.momentum)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._update(g)
        return (g - self.mean.to(g.dtype)) * torch.rsqrt(self.var + self.eps).to(g.dtype)


class PositionEncoding3D(nn.Module):
    """SAM's random Fourier position encoding in 3D: window coordinates in [-1, 1] -> C channels."""

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(channels)  # fixed, so it need not be stored in a bundle
        self.register_buffer("gaussian", scale * torch.randn(3, (channels + 1) // 2, generator=gen), persistent=False)
        self.channels = channels

    def forward(self, spatial: tuple[int, ...]) -> torch.Tensor:
        """-> (1, L, C) for a window of ``spatial`` voxels, flattened like ``features.flatten(2)``."""
        dev = self.gaussian.device
        axes = [(torch.arange(n, device=dev, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        proj = 2 * math.pi * coords @ self.gaussian
        return torch.cat([proj.sin(), proj.cos()], -1)[None, :, : self.channels]


class TwoWayBlock(nn.Module):
    """Text self-attention -> text-to-image attention -> MLP -> image-to-text attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.text_to_image = Attention(dim, heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.image_to_text = Attention(dim, heads, downsample_rate)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text: (B, N, C), image: (B, L, C), image_pe: (1, L, C) -> text and image updated."""
        text = self.norm1(text + self.self_attn(text, text, text))
        text = self.norm2(text + self.text_to_image(text, image + image_pe, image))
        text = self.norm3(text + self.mlp(text))
        image = self.norm4(image + self.image_to_text(image + image_pe, text, text))
        return text, image


class TextImageAlignment(nn.Module):
    """Projects the note embedding g (B, N, D) to C channels and aligns it with a feature map (B, C, *S).

    Returns the feature map with the same shape, updated by ``depth`` two-way blocks.
    """

    def __init__(self, text_dim: int, channels: int, depth: int = 2, heads: int = 8, mlp_dim: int | None = None):
        super().__init__()
        self.project = nn.Linear(text_dim, channels)
        self.position = PositionEncoding3D(channels)
        self.blocks = nn.ModuleList(TwoWayBlock(channels, heads, mlp_dim or 2 * channels) for _ in range(depth))

    def forward(self, features: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        b, c = features.shape[:2]
        spatial = features.shape[2:]
        image = features.flatten(2).transpose(1, 2)  # (B, L, C)
        text = self.project(g.to(image.dtype))
        pe = self.position(tuple(spatial)).to(image.dtype)
        for block in self.blocks:
            text, image = block(text, image, pe)
        return image.transpose(1, 2).reshape(b, c, *spatial)
