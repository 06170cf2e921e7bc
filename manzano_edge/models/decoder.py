"""Unified decoder: a Llama-architecture LM over the joint text + image-code vocabulary.

Module and parameter names match Hugging Face `LlamaForCausalLM` one to one
(`embed_tokens`, `layers.N.self_attn.q_proj`, ..., `norm`, `lm_head`), so a Llama-family
checkpoint maps onto it by adding the `model.` prefix (see `hf_llama.py`).

KV caches are pluggable through `KVCacheWriter`:
- training and no-cache scoring pass none (full causal attention);
- `StatefulDecoder` keeps the cache in top-level buffers written by slice assignment at
  `start = causal_mask.shape[-1] - T`. That one pattern becomes Core ML state, ExecuTorch
  mutable buffers (XNNPACK and the Core ML delegate), and runs in eager PyTorch
  (TOOLCHAIN.md gotcha 8: `index_copy` breaks Core ML);
- `InPlaceKVDecoder` is ExecuTorch XNNPACK's build of the same step: functionalisation turns
  a slice assignment into a `slice_scatter` over the whole cache plus a `copy_` back, two
  full-cache copies per layer per token, so it writes through ExecuTorch's in-place
  `llama::update_cache` and attends with `llama::custom_sdpa` instead;
- ONNX keeps no state, so its exporter passes the cache as explicit inputs/outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import DecoderConfig
from manzano_edge.models.layers import RMSNorm, attention, dims


def rope_tables(cfg: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim], Hugging Face's default (non-interleaved) layout."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


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


def padded_causal_mask(pad: list[int], past: int, new: int) -> torch.Tensor:
    """[B, 1, new, past+new] additive mask; row b hides its first pad[b] (left-padding) keys.

    A padding query still sees itself: a fully masked softmax row is NaN, and NaN keys/values
    would poison the real rows even though they are masked (0 * NaN = NaN)."""
    q = torch.arange(past, past + new)[:, None]
    k = torch.arange(past + new)[None, :]
    base = torch.where(k <= q, 0.0, float("-inf"))
    rows = [base.masked_fill((k < p) & (k != q), float("-inf")) if p else base for p in pad]
    return torch.stack(rows)[:, None]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Token rows of different lengths -> ([B, W] left-padded, pad count per row): a batch whose
    rows end together, so they decode in lockstep (classifier-free guidance)."""
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    return torch.tensor([[pad_id] * p + r for p, r in zip(pad, rows)]), pad


def guidance_rows(cond: list[int], bos_id: int, img_start_id: int) -> list[list[int]]:
    """Image-token CFG's two prompts: the conditional one, and the unconditional one with no text
    (`<bos><img_start>`, as trained). Row 0 is conditional."""
    return [cond, [bos_id, img_start_id]]


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """[2, V] logits of `guidance_rows` -> [1, V]: uncond + scale * (cond - uncond)."""
    return logits[1:] + scale * (logits[:1] - logits[1:])


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
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                layer: int, kv_writer: KVCacheWriter | None, attend: Attend = attention) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(dims(b, t, self.n_heads, self.hd)).transpose(1, 2)
        k = self.k_proj(x).view(dims(b, t, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(dims(b, t, self.n_kv, self.hd)).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_writer is not None:
            k, v = kv_writer(layer, k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(dims(b, t, self.n_heads * self.hd)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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


class StatefulDecoder(nn.Module):
    """Decoder with its KV cache as top-level mutable buffers (`k_cache`, `v_cache`).

    forward(inputs_embeds [B, T, D], causal_mask [B, 1, T, E]) -> logits [B, T, V], or with
    `last_logits` [B, 1, V] (the exported graphs: ExecuTorch's llama export does the same).
    The mask's last dimension E is the cache length after this call, so the write offset is
    E - T: one graph serves prefill (T > 1) and decode (T = 1) with no position input.
    """

    def __init__(self, decoder: LlamaDecoder, batch_size: int = 1, max_len: int | None = None,
                 last_logits: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_logits = last_logits
        cfg = decoder.cfg
        self.max_len = max_len or cfg.max_position_embeddings
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, self.max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Slice (not select) the layer axis: a write through `cache[layer]` functionalises into
            # select_scatter, which ExecuTorch lowers to a `where` over the whole cache of every
            # layer (it took half of a decode step on the portable kernels).
            self.k_cache[layer:layer + 1, :, :, start:end] = k.unsqueeze(0)
            self.v_cache[layer:layer + 1, :, :, start:end] = v.unsqueeze(0)
            return self.k_cache[layer, :, :, :end], self.v_cache[layer, :, :, :end]

        return self.decoder(inputs_embeds=inputs_embeds, start=start, mask=causal_mask, kv_writer=write,
                            last_only=self.last_logits)


def load_executorch_cache_ops() -> None:
    """Registers ExecuTorch's `llama::` custom ops (eager, export and its runtime kernels)."""
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError as exc:
        from manzano_edge.errors import UserError

        raise UserError("executorch is not installed; pip install 'manzano-edge[export]'") from exc


def _row(x: torch.Tensor, r: int) -> torch.Tensor:
    """Row r of a batch, without a slice op when there is one row (a slice on the dynamic
    sequence dim is not delegated to XNNPACK: 4 more partitions on the tiny decoder)."""
    return x if x.shape[0] == 1 else x[r:r + 1]


class InPlaceKVDecoder(nn.Module):
    """`StatefulDecoder`'s step for ExecuTorch XNNPACK, on ExecuTorch's LLM kernels: same inputs,
    outputs and numbers (the export checks parity against `StatefulDecoder`).

    - `llama::update_cache` writes this step's k/v in place, O(T) per step; a slice assignment
      functionalises into `slice_scatter` over the whole cache plus a `copy_` back.
    - `llama::custom_sdpa` attends over the first E cache rows with the graph's mask, grouped
      query heads included, so no repeat_interleave and no transposed copies of the cache.
    The kernels take a 4-D buffer, sequence on dim 1, and not a view of a bigger one (a layer
    slice lowers to `as_strided`, which has no ExecuTorch kernel), so each layer owns
    `k_cache_{i}` / `v_cache_{i}` [1, S, Hkv, hd]. `custom_sdpa` takes one [T, E] mask for all
    rows, so a batch (the CFG decoder's padded rows) runs it once per row, each row with its own
    mask and its own buffers `k_cache_{i}_{row}` / `v_cache_{i}_{row}`.
    """

    def __init__(self, decoder: LlamaDecoder, max_len: int | None = None, last_logits: bool = False,
                 batch_size: int = 1) -> None:
        super().__init__()
        load_executorch_cache_ops()
        self.decoder = decoder
        self.last_logits = last_logits
        cfg = decoder.cfg
        self.max_len = max_len or cfg.max_position_embeddings
        shape = (1, self.max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.rows = [""] if batch_size == 1 else [f"_{r}" for r in range(batch_size)]
        for i in range(cfg.num_hidden_layers):
            for row in self.rows:
                self.register_buffer(f"k_cache_{i}{row}", torch.zeros(shape), persistent=False)
                self.register_buffer(f"v_cache_{i}{row}", torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        for buf in self._buffers.values():  # the caches only, not the decoder's RoPE tables
            buf.zero_()

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            keys, values = [], []
            for r, row in enumerate(self.rows):
                k_cache, v_cache = getattr(self, f"k_cache_{layer}{row}"), getattr(self, f"v_cache_{layer}{row}")
                torch.ops.llama.update_cache(_row(k, r).transpose(1, 2), k_cache, start)
                torch.ops.llama.update_cache(_row(v, r).transpose(1, 2), v_cache, start)
                keys.append(k_cache[:, :end])  # [1, E, Hkv, hd]
                values.append(v_cache[:, :end])
            return keys, values

        def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                   mask: torch.Tensor) -> torch.Tensor:
            # The graph's mask is [B, 1, T, E]; the kernel wants one row's [T, E].
            out = [torch.ops.llama.custom_sdpa(_row(q, r).transpose(1, 2), keys[r], values[r], 0, mask[r, 0], 0.0,
                                               False) for r in range(len(self.rows))]
            return (out[0] if len(out) == 1 else torch.cat(out)).transpose(1, 2)

        return self.decoder(inputs_embeds=inputs_embeds, start=start, mask=causal_mask, kv_writer=write, attend=attend,
                            last_only=self.last_logits)


class ExplicitKVDecoder(nn.Module):
    """The same step as `StatefulDecoder`, with the cache passed in and returned (ONNX keeps no
    state; a mutable buffer would be frozen into the graph as a constant, TOOLCHAIN gotcha 1).

    forward(inputs_embeds [B,T,D], causal_mask [B,1,T,E], k_cache, v_cache [L,B,Hkv,S,hd])
      -> logits [B,T,V], k_cache_out, v_cache_out (same shapes as the inputs).
    """

    def __init__(self, decoder: LlamaDecoder, last_logits: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_logits = last_logits

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t
        k_layers, v_layers = list(k_cache.unbind(0)), list(v_cache.unbind(0))

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k_layers[layer] = torch.cat([k_layers[layer][:, :, :start], k, k_layers[layer][:, :, end:]], dim=2)
            v_layers[layer] = torch.cat([v_layers[layer][:, :, :start], v, v_layers[layer][:, :, end:]], dim=2)
            return k_layers[layer][:, :, :end], v_layers[layer][:, :, :end]

        logits = self.decoder(inputs_embeds=inputs_embeds, start=start, mask=causal_mask, kv_writer=write,
                              last_only=self.last_logits)
        return logits, torch.stack(k_layers), torch.stack(v_layers)
