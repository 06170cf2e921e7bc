"""Unified decoder: a Llama-architecture LM over the joint text + image-code vocabulary.

Module and parameter names match Hugging Face `LlamaForCausalLM` one to one
(`embed_tokens`, `layers.N.self_attn.q_proj`, ..., `norm`, `lm_head`), so a Llama-family
checkpoint maps onto it by adding the `model.` prefix (see `hf_decoder.py`).

KV caches are pluggable through `KVCacheWriter` (and attention through `Attend`): training and
no-cache scoring pass none (full causal attention); the deployment builds of one cached step
(stateful, explicit I/O, in-place kernels) are in `manzano_edge.spec.modules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import DecoderConfig
from manzano_edge.models.layers import RMSNorm, attention, dims


def rope_inv_freq(cfg: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, as Hugging Face computes them for
    plain RoPE and for each `rope_scaling` type in `ROPE_SCALING_KEYS`."""
    hd, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, scaling)
    return inv_freq, 1.0  # plain, or dynamic NTK within its original length (config.rope_scaling_problems)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(cfg: DecoderConfig, s: dict) -> tuple[torch.Tensor, float]:
    hd, base, factor = cfg.head_dim, cfg.rope_theta, s["factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return hd * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, hd, 2).float() / hd)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_tables(cfg: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim], Hugging Face's default (non-interleaved) layout."""
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def causal_mask(past: int, new: int, device: torch.device | None = None) -> torch.Tensor:
    """Additive mask [1, 1, new, past+new]: query i (absolute past+i) sees keys <= past+i."""
    q = torch.arange(past, past + new, device=device)[:, None]
    k = torch.arange(past + new, device=device)[None, :]
    return torch.where(k <= q, 0.0, float("-inf"))[None, None]


class KVCacheWriter(Protocol):
    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, Hkv, T, hd] for `layer`; return all keys/values to attend to."""
        ...


# (q [B,H,T,hd], keys, values as the KV-cache writer returns them, additive mask [B,1,T,S]) -> [B,H,T,hd]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.attention_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                layer: int, kv_writer: KVCacheWriter | None, attend: Attend = attention) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(dims(b, t, self.n_heads, self.hd))
        k = self.k_proj(x).view(dims(b, t, self.n_kv, self.hd))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(dims(b, t, self.n_kv, self.hd)).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_writer is not None:
            k, v = kv_writer(layer, k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(dims(b, t, self.n_heads * self.hd)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer, kv_writer, attend=attention):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, kv_writer, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def forward(self, tokens: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                start: int | torch.SymInt = 0, mask: torch.Tensor | None = None,
                kv_writer: KVCacheWriter | None = None, attend: Attend = attention,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for T new positions starting at absolute position `start`, or with
        `last_only` [B, 1, V] for the last of them (generation needs no other row).

        Give `tokens` [B, T] or `inputs_embeds` [B, T, D] (spliced image embeddings).
        Without `mask` this is plain causal attention over the T positions (training).
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of tokens / inputs_embeds")
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        if mask is None:
            mask = causal_mask(0, t, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, i, kv_writer, attend)
        if last_only:  # a prefill of T tokens runs the vocabulary projection once, not T times
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
