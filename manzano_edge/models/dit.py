"""Latent diffusion transformer trained with conditional flow matching.

DiT blocks with adaLN-Zero timestep modulation and cross-attention to the image-token
features (the discrete adapter's output), which are also resampled onto the latent patch
grid and added at the input. DiT-Air style, one adaLN modulation network is shared by all
blocks, which each add a learned per-block bias to it.

Flow convention (rectified flow): x_t = (1 - t) * noise + t * data, t in [0, 1]; the network
predicts the velocity data - noise; sampling integrates from t=0 (noise) to t=1 (data).
The sampling loop lives in the runtime, never in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import ModelConfig
from manzano_edge.models.layers import GeluMLP, LayerNorm, MultiHeadAttention, RMSNorm, dims, sinusoidal_embedding

TIME_EMBED_DIM = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def token_to_patch_matrix(num_tokens: int, patch_grid: int, mode: str = "bilinear") -> torch.Tensor:
    """[patch_grid^2, num_tokens]: resampling ("bilinear" or "nearest") of a square token grid onto
    the latent patch grid, as one constant matmul (exports the same everywhere, unlike an
    interpolate op)."""
    side = int(round(num_tokens ** 0.5))
    basis = torch.eye(num_tokens).reshape(num_tokens, 1, side, side)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    resampled = F.interpolate(basis, size=(patch_grid, patch_grid), mode=mode, **kwargs)
    return resampled.reshape(num_tokens, patch_grid * patch_grid).T.contiguous()


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(width, heads)
        self.norm_cross = LayerNorm(width, eps=1e-6)
        self.cross_attn = MultiHeadAttention(width, heads)
        self.norm2 = LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = GeluMLP(width, width * mlp_ratio)
        self.mod_bias = nn.Parameter(torch.zeros(6, width))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mod = mod.view(dims(mod.shape[0], 6, self.mod_bias.shape[1])) + self.mod_bias
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, c = cfg.dit, cfg.vae.latent_channels
        self.patch, self.channels, self.size = d.patch_size, c, cfg.latent_size
        grid = self.size // self.patch
        self.patch_embed = nn.Linear(self.patch * self.patch * c, d.width)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d.width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_EMBED_DIM, d.width), nn.SiLU(), nn.Linear(d.width, d.width))
        # The condition arrives at the token-embedding scale (~0.02 RMS, the adapter's RMSNorm
        # gain): normalise it first, or cross-attention sees only its own bias and the DiT
        # learns the unconditional distribution (reconstructions ignored their tokens).
        self.cond_norm = RMSNorm(cfg.decoder.hidden_size)
        self.cond_proj = nn.Linear(cfg.decoder.hidden_size, d.width)
        # Learned "no condition" token: classifier-free guidance's unconditional branch.
        self.null_cond = nn.Parameter(torch.randn(1, 1, cfg.decoder.hidden_size) * 0.02)
        # Each latent patch also adds the condition of the image tokens over it (resampled per
        # `cond_resample`). With cross-attention alone the tiny DiT never learned to use its condition
        # (loss with shuffled conditions was the same); the token grid is spatial, so say so.
        self.register_buffer("token_to_patch", token_to_patch_matrix(cfg.vision.num_image_tokens, grid, d.cond_resample),
                             persistent=False)
        n_mod = 1 if d.share_adaln else d.depth
        self.adaln = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(d.width, 6 * d.width)) for _ in range(n_mod))
        self.blocks = nn.ModuleList(DiTBlock(d.width, d.heads, d.mlp_ratio) for _ in range(d.depth))
        self.final_norm = LayerNorm(d.width, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(d.width, 2 * d.width))
        self.final = nn.Linear(d.width, self.patch * self.patch * c)
        for mod in [*self.adaln, self.final_mod, self.final]:
            last = mod[-1] if isinstance(mod, nn.Sequential) else mod
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    # Reshapes stay at rank <= 5: Core ML rejects rank-6 tensors.
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], features ordered (row-in-patch, col-in-patch, channel)."""
        b, c, h, w = x.shape
        p, g = self.patch, h // self.patch
        x = x.reshape(dims(b * c, g, p, g, p)).permute(0, 1, 3, 2, 4)  # [B*C, g, g, p, p]
        return x.reshape(dims(b, c, g * g, p * p)).permute(0, 2, 3, 1).reshape(dims(b, g * g, p * p * c))

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, c, g = x.shape[0], self.patch, self.channels, self.size // self.patch
        x = x.reshape(dims(b, g * g, p * p, c)).permute(0, 3, 1, 2)  # [B, C, g*g, p*p]
        x = x.reshape(dims(b * c, g, g, p, p)).permute(0, 1, 3, 2, 4)  # [B*C, g, p, g, p]
        return x.reshape(dims(b, c, g * p, g * p))

    def unconditional(self, batch: int, tokens: int) -> torch.Tensor:
        return self.null_cond.expand(batch, tokens, -1)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """latent [B, C, h, w], timestep [B] in [0, 1], cond [B, M, llm width] -> velocity [B, C, h, w]."""
        ctx = self.cond_proj(self.cond_norm(cond))
        x = self.patch_embed(self._patchify(latent)) + self.pos_embed + torch.matmul(self.token_to_patch.to(ctx.dtype), ctx)
        temb = self.time_mlp(sinusoidal_embedding(timestep * 1000.0, TIME_EMBED_DIM).to(x.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, self.adaln[0 if len(self.adaln) == 1 else i](temb), ctx)
        shift, scale = self.final_mod(temb).chunk(2, dim=-1)
        return self._unpatchify(self.final(modulate(self.final_norm(x), shift, scale)))


def flow_matching_loss(dit: DiT, data_latent: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                       cond_dropout: float = 0.1, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity MSE; `weight` [B, 1, h, w] (optional) re-weights latent cells, normalised to mean 1."""
    b = data_latent.shape[0]
    noise = torch.randn(data_latent.shape, generator=generator)
    # Logit-normal timesteps (SD3): more weight on the middle of the path.
    t = torch.sigmoid(torch.randn(b, generator=generator))
    x_t = (1 - t)[:, None, None, None] * noise + t[:, None, None, None] * data_latent
    drop = torch.rand(b, generator=generator) < cond_dropout
    cond = torch.where(drop[:, None, None], dit.unconditional(b, cond.shape[1]), cond)
    err = (dit(x_t, t, cond) - (data_latent - noise)) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).mean() / weight.mean()
