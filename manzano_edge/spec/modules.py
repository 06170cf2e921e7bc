"""The modules the graphs are built from: each graph's step, and the three state layouts of the
decoder's cached step (`StateLayout`):

- `StatefulDecoder` (STATEFUL, the reference) keeps the cache in top-level buffers written by
  slice assignment at `start = causal_mask.shape[-1] - T`. That one pattern becomes a runtime's
  graph state (Core ML states, ExecuTorch mutable buffers) and runs in eager PyTorch
  (TOOLCHAIN.md gotcha 8: `index_copy` breaks Core ML);
- `InPlaceKVDecoder` (INPLACE) is the same step on ExecuTorch's LLM kernels: functionalisation
  turns a slice assignment into a `slice_scatter` over the whole cache plus a `copy_` back, two
  full-cache copies per layer per token, so it writes through the in-place `llama::update_cache`
  and attends with `llama::custom_sdpa` instead;
- `ExplicitKVDecoder` (EXPLICIT) passes the cache in and out, for runtimes that keep no state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from manzano_edge.data.images import pixels_from_uint8
from manzano_edge.errors import UserError
from manzano_edge.models.decoder import LlamaDecoder
from manzano_edge.models.manzano import Manzano

if TYPE_CHECKING:
    from manzano_edge.spec.graphs import GraphSpec


class TokenizerGraph(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, ids = self.tokenizer(pixels)
        return embeds, ids.to(torch.int32)


class EmbedGraph(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.embed_tokens = model.decoder.embed_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens.long())


class CodeFeaturesGraph(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.discrete = model.tokenizer.discrete

    def forward(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.discrete.ids_to_features(image_ids.long())


class DiTGraph(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.dit = model.dit

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.dit(latent, timestep, condition)


class StatefulDecoder(nn.Module):
    """Decoder with its KV cache as top-level mutable buffers (`k_cache`, `v_cache`).

    forward(inputs_embeds [B, T, D], causal_mask [B, 1, T, E]) -> logits [B, T, V], or with
    `last_logits` [B, 1, V] (the exported graphs: ExecuTorch's llama export does the same).
    The mask's last dimension E is the cache length after this call, so the write offset is
    E - T: one graph serves prefill (T > 1) and decode (T = 1) with no position input.
    """

    def __init__(self, decoder: LlamaDecoder, batch_size: int = 1, max_len: int | None = None,
                 last_logits: bool = False, cache_names: tuple[str, str] = ("k_cache", "v_cache")) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_logits = last_logits
        cfg = decoder.cfg
        self.max_len = max_len or cfg.max_position_embeddings
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, self.max_len, cfg.head_dim)
        self.cache_names = cache_names
        for name in cache_names:
            self.register_buffer(name, torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        for name in self.cache_names:
            getattr(self, name).zero_()

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t
        k_cache, v_cache = (getattr(self, name) for name in self.cache_names)

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Slice (not select) the layer axis: a write through `cache[layer]` functionalises into
            # select_scatter, which ExecuTorch lowers to a `where` over the whole cache of every
            # layer (it took half of a decode step on the portable kernels).
            k_cache[layer:layer + 1, :, :, start:end] = k.unsqueeze(0)
            v_cache[layer:layer + 1, :, :, start:end] = v.unsqueeze(0)
            return k_cache[layer, :, :, :end], v_cache[layer, :, :, :end]

        return self.decoder(inputs_embeds=inputs_embeds, start=start, mask=causal_mask, kv_writer=write,
                            last_only=self.last_logits)


class AppleLLMDecoder(StatefulDecoder):
    """`StatefulDecoder`'s step in Apple's Core ML LLM convention (`Convention.APPLE_LLM`): token ids
    (`takes_tokens`) or embeddings and an additive mask in, the logits of every new position out
    (swift-transformers reads row T - 1), the cache in the buffers `keyCache` / `valueCache`."""

    def __init__(self, decoder: LlamaDecoder, takes_tokens: bool) -> None:
        super().__init__(decoder, cache_names=("keyCache", "valueCache"))
        self.takes_tokens = takes_tokens

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(self.decoder.embed_tokens(x) if self.takes_tokens else x, causal_mask)


class LastPositionLogits(nn.Module):
    """A step that returns every new position's logits, behind the graph's own I/O: inputs cast to
    the step's dtypes (`dtypes`, by position), the last position's logits out."""

    def __init__(self, step: nn.Module, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.step, self.dtypes = step, dtypes

    def reset(self) -> None:
        self.step.reset()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.step(*(x.to(dtype) for x, dtype in zip(inputs, self.dtypes)))[:, -1:]


def load_executorch_cache_ops() -> None:
    """Registers ExecuTorch's `llama::` custom ops (eager, export and its runtime kernels)."""
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError as exc:
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


def build_module(spec: GraphSpec, model: Manzano, layout: str = "stateful") -> nn.Module:
    """The graph's module in one state layout (`StateLayout`); the STATEFUL build where the spec
    declares no other for that layout."""
    module = spec.layouts.get(layout, spec.build)(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)  # ExecuTorch refuses in-place buffer writes next to grad-requiring leaves
    return module


def reset_states(module: nn.Module, spec: GraphSpec) -> None:
    """Zero a module's KV-cache buffers: the spec's states, or their per-layer split (`k_cache_3`)
    in the INPLACE build. Works on exported/quantized GraphModules, which have no `reset()`."""
    names = {s.name for s in spec.states}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            leaf = name.split(".")[-1]
            if leaf in names or leaf.rstrip("0123456789").rstrip("_") in names:
                buf.zero_()


# -- the stock VLM layout (`StateLayout.PER_LAYER`): vision -> embedding -> decoder ---------------
class VisionFeatures(nn.Module):
    """pixel_values [1, 3, H, W] -> image_features [N, D]: the understanding branch alone, 2-D as
    the stock VLM runtimes take it (rows of all images, so a text-only prompt passes [0, D])."""

    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(pixel_values)[0][0]


class SplicingEmbedding(nn.Module):
    """input_ids [B, S] with a negative id at each image slot, image_features [n, D] -> inputs_embeds
    [B, S, D]: the k-th negative id takes the k-th feature row. The runtime passes [0, D] features
    for text-only steps, so a zero row is prepended and text positions gather it (then discarded)."""

    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.embed_tokens = model.decoder.embed_tokens

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()
        is_image = ids < 0
        slot = torch.cumsum(is_image.long().flatten(), 0).view(ids.shape) * is_image.long()
        rows = torch.cat([image_features.new_zeros(1, image_features.shape[-1]), image_features])
        return torch.where(is_image.unsqueeze(-1), rows[slot], self.embed_tokens(ids.clamp(min=0)))


class PerLayerKVDecoder(nn.Module):
    """`StatefulDecoder`'s step in the stock LLM runtimes' I/O: an integer `attention_mask` [B, total]
    (1 = a real key) from which the graph builds the causal mask itself, and the cache as one
    tensor per layer, `past_key_values.{i}.key/value` [B, Hkv, past, hd] in and the grown
    `present.{i}.key/value` [B, Hkv, past + T, hd] out (past = total - T)."""

    def __init__(self, decoder: LlamaDecoder, last_logits: bool = True) -> None:
        super().__init__()
        self.decoder = decoder
        self.last_logits = last_logits

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        t, total = inputs_embeds.shape[1], attention_mask.shape[1]
        start = total - t
        q = torch.arange(t, device=inputs_embeds.device)[:, None] + start
        k = torch.arange(total, device=inputs_embeds.device)[None, :]
        # A query always sees its own key, so a padding row is never fully masked (NaN).
        allowed = ((k <= q) & (attention_mask[:, None, None, :] != 0)) | (k == q)
        mask = torch.where(allowed, 0.0, float("-inf")).to(inputs_embeds.dtype)
        presents: list[torch.Tensor] = []

        def write(layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = torch.cat([past[2 * layer], k_new], dim=2)
            values = torch.cat([past[2 * layer + 1], v_new], dim=2)
            presents.extend((keys, values))
            return keys, values

        logits = self.decoder(inputs_embeds=inputs_embeds, start=start, mask=mask, kv_writer=write,
                              last_only=self.last_logits)
        return (logits, *presents)


# -- the stock LLM-runner layout (`Convention.STOCK_LLM_RUNNER`): one program, a method per graph ----
class PositionedKVDecoder(nn.Module):
    """`StatefulDecoder`'s step in the I/O of ExecuTorch's LLM runners: the start position
    `input_pos` [1] instead of a mask (attention is causal over cache rows [0, input_pos + T)), token
    ids or embeddings in, last-position logits [1, 1, V] out. The cache is per-layer mutable buffers
    written in place by `llama::update_cache`, attended by `llama::custom_sdpa` (as `InPlaceKVDecoder`)."""

    def __init__(self, decoder: LlamaDecoder, takes_tokens: bool, max_len: int | None = None) -> None:
        super().__init__()
        load_executorch_cache_ops()
        self.decoder, self.takes_tokens = decoder, takes_tokens
        cfg = decoder.cfg
        self.max_len = max_len or cfg.max_position_embeddings
        shape = (1, self.max_len, cfg.num_key_value_heads, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        for buf in self._buffers.values():
            buf.zero_()

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        if self.takes_tokens:
            x = decoder.embed_tokens(x)
        t = x.shape[1]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + t <= self.max_len)

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
            torch.ops.llama.update_cache(k.transpose(1, 2), k_cache, start)
            torch.ops.llama.update_cache(v.transpose(1, 2), v_cache, start)
            return k_cache, v_cache

        def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return torch.ops.llama.custom_sdpa(q.transpose(1, 2), keys, values, start, None, 0.0, True).transpose(1, 2)

        # No mask: custom_sdpa is causal from `start` itself (the decoder's default mask goes unused).
        return decoder(inputs_embeds=x, start=start, mask=None, kv_writer=write, attend=attend, last_only=True)


class ImageEmbeddings(nn.Module):
    """uint8 image [1, 3, H, W] (what the runners pass for an RGB image) -> image_embeds [1, N, D]: the
    pipeline contract's x / 127.5 - 1 done in the graph."""

    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.embed_continuous(pixels_from_uint8(image))
