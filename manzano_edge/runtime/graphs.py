"""The graph-level interface a pipeline runs on, and its PyTorch-eager implementation.

The pipeline never touches model modules directly, only these calls, one per on-device
graph (tokenizer branches, token embedding, stateful decoder step, code features, DiT
step, VAE decoder). An exported bundle implements the same interface per backend, so
`understand`/`generate` are identical on every backend.
"""

from __future__ import annotations

from typing import Protocol

import torch

from manzano_edge.models.manzano import Manzano
from manzano_edge.spec.modules import StatefulDecoder


class GraphRunner(Protocol):
    def vision_embeddings(self, pixels: torch.Tensor) -> torch.Tensor: ...  # [1,3,H,W] -> [1,N,D]
    def image_ids(self, pixels: torch.Tensor) -> torch.Tensor: ...  # [1,3,H,W] -> [1,N] int64
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [B,T] -> [B,T,D]
    def decoder_reset(self, batch_size: int) -> None: ...
    def decoder_step(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...  # -> last-position logits [B,1,V]
    def code_features(self, ids: torch.Tensor) -> torch.Tensor: ...  # [B,N] -> [B,N,D]
    def null_condition(self, batch: int, tokens: int) -> torch.Tensor: ...
    def denoise(self, latent: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...
    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor: ...  # unscaled latent -> pixels


class TorchGraphs:
    """Reference backend: eager PyTorch on the float checkpoint."""

    def __init__(self, model: Manzano) -> None:
        self.model = model.eval()
        self.decoders: dict[int, StatefulDecoder] = {}
        self._active: StatefulDecoder | None = None

    @torch.no_grad()
    def vision_embeddings(self, pixels):
        return self.model.tokenizer.embed_continuous(pixels)

    @torch.no_grad()
    def image_ids(self, pixels):
        return self.model.tokenizer.image_to_ids(pixels)

    @torch.no_grad()
    def embed_tokens(self, tokens):
        return self.model.decoder.embed(tokens)

    def decoder_reset(self, batch_size: int) -> None:
        if batch_size not in self.decoders:
            self.decoders[batch_size] = StatefulDecoder(self.model.decoder, batch_size=batch_size, last_logits=True).eval()
        self._active = self.decoders[batch_size]
        self._active.reset()

    @torch.no_grad()
    def decoder_step(self, embeds, mask):
        assert self._active is not None, "decoder_reset() first"
        return self._active(embeds, mask)

    @torch.no_grad()
    def code_features(self, ids):
        return self.model.tokenizer.discrete.ids_to_features(ids)

    @torch.no_grad()
    def null_condition(self, batch, tokens):
        return self.model.dit.unconditional(batch, tokens)

    @torch.no_grad()
    def denoise(self, latent, t, cond):
        return self.model.dit(latent, t, cond)

    @torch.no_grad()
    def vae_decode(self, latent):
        return self.model.vae.decoder(latent)
