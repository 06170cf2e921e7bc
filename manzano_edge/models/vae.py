"""Small convolutional VAE. The encoder is used for training only; on device only the
decoder runs (latent -> pixels). Upsampling is nearest + conv rather than transposed
convolution so it converts the same way on every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import VAEConfig


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class NearestUpsample2x(nn.Module):
    """`nn.Upsample(scale_factor=2, mode="nearest")`, bit for bit, as unsqueeze + cat + view.
    ExecuTorch's XNNPACK partitioner has no config for `upsample_nearest2d`, so each upsample
    split the decoder into another delegate with a portable-kernel op between (the ExecuTorch
    VAE decoder ran slower than eager); unsqueeze, cat and static views all lower. Rank stays
    <= 5 for Core ML."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Two separate views of the same tensor: XNNPACK's cat config counts distinct input
        # nodes, and rejects cat([x, x]) as a one-input concatenation.
        cols = torch.cat([x.unsqueeze(-1), x.unsqueeze(-1)], dim=-1)  # each column twice
        rows = cols.view(b, c, h, 1, 2 * w)
        return torch.cat([rows, cols.view(b, c, h, 1, 2 * w)], dim=3).view(b, c, 2 * h, 2 * w)  # each row twice


class VAEEncoder(nn.Module):
    # No residual blocks at full resolution: on CPU they cost more than the rest combined.
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        stem = cfg.channels[0] // 2
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1)]
        prev = stem
        for ch in cfg.channels:
            layers += [nn.SiLU(), nn.Conv2d(prev, ch, 4, stride=2, padding=1), ResBlock(ch)]
            prev = ch
        layers += [nn.SiLU(), nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(pixels).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = list(reversed(cfg.channels)) + [cfg.channels[0] // 2]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1), ResBlock(chans[0])]
        for i, (prev, ch) in enumerate(zip(chans, chans[1:])):
            layers += [NearestUpsample2x(), nn.Conv2d(prev, ch, 3, padding=1)]
            layers.append(ResBlock(ch) if i < len(chans) - 2 else nn.SiLU())
        layers += [nn.Conv2d(chans[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled-back latent [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1]."""
        return torch.tanh(self.net(latent))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)

    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: pixels -> (reconstruction through a sampled latent, KL to N(0, I)).
        The reconstruction loss is the caller's choice (the trainer weights the foreground)."""
        mean, logvar = self.encoder(pixels)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return self.decoder(z), kl
