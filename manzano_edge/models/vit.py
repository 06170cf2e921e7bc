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
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg.width, cfg.heads)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.width, cfg.intermediate_size, act=cfg.hidden_act)

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
        positions = cfg.grid * cfg.grid + int(cfg.class_token)
        if cfg.class_token:
            self.class_embed = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, positions, cfg.width) * 0.02)
        if cfg.pre_norm:
            self.pre_norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.layers))
        if cfg.final_norm:
            self.norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W] in [-1, 1] -> patch features [B, grid*grid, width] (a class token, where
        the tower has one, attends with the patches and is dropped from the output)."""
        x = self.patch_embed(self.stem(pixels)).flatten(2).transpose(1, 2)
        if self.cfg.class_token:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.cfg.pre_norm:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.cfg.class_token:
            x = x[:, 1:]
        return self.norm(x) if self.cfg.final_norm else x
