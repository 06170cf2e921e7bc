"""MANZANO hybrid vision tokenizer: one ViT shared by two adapters.

- continuous adapter (understanding): 3x3 spatial-to-channel fold, MLP to the LLM width;
- discrete adapter (generation): the same fold, a projection to a few FSQ channels, FSQ,
  then an MLP from the code to the LLM width. `image -> ids` and `ids -> code features`
  are exposed separately because generation only ever has ids.

Both adapters add a learned position embedding over the image tokens: with RoPE alone the
LLM could not tell where an image token came from (TRAINING-NOTES.md, fact 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import LINEAR_ALIGN, STC_FACTOR, ModelConfig
from manzano_edge.models.fsq import FSQ
from manzano_edge.models.layers import RMSNorm
from manzano_edge.models.vit import ViTEncoder


def spatial_to_channel(features: torch.Tensor, grid: int, factor: int = STC_FACTOR) -> torch.Tensor:
    """[B, grid*grid, C] -> [B, (grid/f)^2, C*f*f]: fold each f x f block of patches into one token."""
    b, _, c = features.shape
    g = grid // factor
    # [B*g, f, g, f, C]: block row folded into the batch so no tensor exceeds rank 5 (Core ML's limit).
    x = features.reshape(b * g, factor, g, factor, c).permute(0, 2, 1, 3, 4)
    return x.reshape(b, g * g, factor * factor * c)


class AdapterMLP(nn.Module):
    """MLP to the LLM width, then RMSNorm whose gain starts at the token-embedding scale (0.02).
    Without it the image embeddings grew ~700x larger than text embeddings, and in a pre-norm
    decoder the image positions' residual stream then stays frozen at the raw adapter output."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = RMSNorm(out_dim)
        nn.init.constant_(self.norm.weight, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class ContinuousAdapter(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.grid = cfg.vision.grid
        self.mlp = AdapterMLP(cfg.vision.stc_width, cfg.decoder.hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.vision.num_image_tokens, cfg.decoder.hidden_size) * 0.02)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(spatial_to_channel(patch_features, self.grid)) + self.pos_embed


class DiscreteAdapter(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.grid = cfg.vision.grid
        self.fsq = FSQ(cfg.vision.fsq_levels)
        self.to_code = nn.Linear(cfg.vision.stc_width, cfg.vision.code_dim)
        # The code has only len(levels) channels; zero-pad it to 32 so the MLP's first
        # Linear keeps a 32-aligned input width (int4 group quantization).
        self.code_pad = -cfg.vision.code_dim % LINEAR_ALIGN
        self.mlp = AdapterMLP(cfg.vision.code_dim + self.code_pad, cfg.decoder.hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.vision.num_image_tokens, cfg.decoder.hidden_size) * 0.02)

    def project(self, patch_features: torch.Tensor) -> torch.Tensor:
        """The unbounded pre-quantization values z [B, N, code_dim] (training watches their range)."""
        return self.to_code(spatial_to_channel(patch_features, self.grid))

    def codes(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.fsq.quantize(self.project(patch_features))

    def codes_to_features(self, codes: torch.Tensor) -> torch.Tensor:
        # No slicing of pos_embed: a no-op slice becomes an `alias` node that Core ML cannot convert.
        return self.mlp(F.pad(codes, (0, self.code_pad))) + self.pos_embed

    def ids_to_features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N] in [0, codebook) -> code features [B, N, llm width]."""
        return self.codes_to_features(self.fsq.indices_to_codes(ids))


class HybridTokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = ViTEncoder(cfg.vision)
        self.continuous = ContinuousAdapter(cfg)
        self.discrete = DiscreteAdapter(cfg)

    def embed_continuous(self, pixels: torch.Tensor) -> torch.Tensor:
        """Understanding branch: [B, 3, H, W] -> [B, N, llm width]."""
        return self.continuous(self.encoder(pixels))

    def image_to_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """Generation branch: [B, 3, H, W] -> image-code ids [B, N] (int64)."""
        return self.discrete.fsq.codes_to_indices(self.discrete.codes(self.encoder(pixels)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(pixels)
        ids = self.discrete.fsq.codes_to_indices(self.discrete.codes(features))
        return self.continuous(features), ids
