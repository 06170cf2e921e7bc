"""ViT encoder: (optional conv stem) + conv patchify, learned absolute position embedding,
pre-norm blocks.

Output keeps the patch grid layout, [B, grid*grid, width], so the 3x3 spatial-to-channel
fold downstream can recover 2-D neighbourhoods.
"""

from __future__ import annotations

import torch
from torch import nn

from manzano_edge.config import VisionConfig
from manzano_edge.models.layers import GeluMLP, LayerNorm, MultiHeadAttention


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.norm2 = LayerNorm(width)
        self.mlp = GeluMLP(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.conv_stem:
            c1, c2 = cfg.conv_stem
            self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.GELU(approximate="tanh"),
                                      nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(approximate="tanh"))
            patch, in_ch = cfg.patch_size // 4, c2
        else:
            self.stem = nn.Identity()
            patch, in_ch = cfg.patch_size, 3
        self.patch_embed = nn.Conv2d(in_ch, cfg.width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W] in [-1, 1] -> patch features [B, grid*grid, width]."""
        x = self.patch_embed(self.stem(pixels)).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
