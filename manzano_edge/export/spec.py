"""The on-device contract: every graph declared once.

A `GraphSpec` names the module to export, its inputs/outputs (name, shape with named
dynamic dims, dtype), its KV-cache states, and how to build real example inputs. The
exporters (Core ML, ONNX, ExecuTorch), the bundle manifest, the runtime's input checks, the
validator and the benchmark all read these declarations; none re-declares shapes.

Graphs (loops stay in the runtime):
- tokenizer:      pixels -> continuous image embeddings (understanding) and discrete ids
                  (generation). One graph with two outputs: both branches share the ViT, so
                  one graph runs the encoder once and ships its weights once.
- embed_tokens:   token ids -> embeddings (the decoder takes embeddings so image embeddings
                  can be spliced in, as ExecuTorch's LLaVA export does).
- decoder:        one prefill-or-decode step with a KV cache. `causal_mask` [B,1,T,E]
                  carries the cache length E after the step, so one graph does prefill
                  (T>1) and decode (T=1). Core ML / ExecuTorch keep the cache as state;
                  ONNX passes it as k_cache/v_cache inputs and *_out outputs.
- code_features:  image-code ids -> discrete-adapter features (the DiT's condition).
- dit:            one flow-matching velocity evaluation; batch 1 or 2 (CFG).
- vae_decoder:    latent -> pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from manzano_edge.config import ModelConfig
from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.decoder import (
    ExplicitKVDecoder,
    InPlaceKVDecoder,
    StatefulDecoder,
    causal_mask,
    guidance_rows,
    guided_logits,
    left_pad,
    padded_causal_mask,
)
from manzano_edge.models.manzano import Manzano

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


@dataclass(frozen=True)
class Dim:
    name: str
    min: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | Dim, ...]
    dtype: str = "float32"
    allow_inf: bool = False  # additive attention masks carry -inf by design (never NaN)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [d.name if isinstance(d, Dim) else d for d in self.shape]}

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d.name] if isinstance(d, Dim) else d for d in self.shape)

    def check(self, value: torch.Tensor, graph: str) -> None:
        """Refuse a runtime input that breaks the declaration, with one clear line."""
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{graph}: input '{self.name}' must be a tensor, got {type(value).__name__}")
        if value.dtype != DTYPES[self.dtype]:
            raise UserError(f"{graph}: input '{self.name}' must be {self.dtype}, got {str(value.dtype)[6:]}")
        if value.dim() != len(self.shape):
            raise UserError(f"{graph}: input '{self.name}' must have shape {self.to_json()['shape']}, "
                            f"got {list(value.shape)}")
        for size, want in zip(value.shape, self.shape):
            ok = want.min <= size <= want.max if isinstance(want, Dim) else size == want
            if not ok:
                rng = f"{want.name} in [{want.min}, {want.max}]" if isinstance(want, Dim) else str(want)
                raise UserError(f"{graph}: input '{self.name}' has shape {list(value.shape)}; expected "
                                f"{self.to_json()['shape']} with {rng}")
        if value.is_floating_point():
            bad = torch.isnan(value).any() if self.allow_inf else not torch.isfinite(value).all()
            if bad:
                raise UserError(f"{graph}: input '{self.name}' contains NaN{'' if self.allow_inf else ' or Inf'}")


@dataclass
class GraphSpec:
    name: str
    family: str  # tokenizer | decoder | diffusion
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[Manzano], nn.Module]
    states: tuple[TensorSpec, ...] = ()
    build_explicit: Callable[[Manzano], nn.Module] | None = None  # stateless variant (ONNX)
    # ExecuTorch XNNPACK variant: same I/O and numbers, states laid out for in-place kernels
    build_executorch: Callable[[Manzano], nn.Module] | None = None
    # Not in the default export set, and the runtime runs without it (a feature needs it).
    optional: bool = False
    dims: dict[str, Dim] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in (*self.inputs, *self.outputs, *self.states):
            for d in t.shape:
                if isinstance(d, Dim):
                    self.dims[d.name] = d

    def io(self, explicit_state: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs/outputs as a format sees them: states become inputs and `*_out` outputs when
        the format keeps no state."""
        if not explicit_state or not self.states:
            return self.inputs, self.outputs
        outs = tuple(TensorSpec(f"{s.name}_out", s.shape, s.dtype) for s in self.states)
        return self.inputs + self.states, self.outputs + outs

    def manifest_io(self, explicit_state: bool) -> dict:
        inputs, outputs = self.io(explicit_state)
        return {"inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs],
                "states": [] if explicit_state else [t.to_json() for t in self.states],
                "dynamic_dims": {d.name: {"min": d.min, "max": d.max} for d in self.dims.values()}}

    def check_inputs(self, values: dict[str, torch.Tensor], explicit_state: bool = False) -> None:
        inputs, _ = self.io(explicit_state)
        missing = [t.name for t in inputs if t.name not in values]
        if missing:
            raise UserError(f"{self.name}: missing input(s) {missing}")
        for t in inputs:
            t.check(values[t.name], self.name)


class _Tokenizer(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.tokenizer = model.tokenizer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, ids = self.tokenizer(pixels)
        return embeds, ids.to(torch.int32)


class _Embed(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.embed_tokens = model.decoder.embed_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens.long())


class _CodeFeatures(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.discrete = model.tokenizer.discrete

    def forward(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.discrete.ids_to_features(image_ids.long())


class _DiT(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.dit = model.dit

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.dit(latent, timestep, condition)


def graph_specs(cfg: ModelConfig) -> dict[str, GraphSpec]:
    v, d = cfg.vision, cfg.decoder
    hw, n, width = v.image_size, v.num_image_tokens, d.hidden_size
    # Cap dynamic lengths at max_len - 1: a dim that can equal the full cache length makes
    # torch.export specialise on it (TOOLCHAIN gotcha 9).
    ctx = d.max_position_embeddings - 1
    seq = Dim("seq", 1, ctx)
    end = Dim("cache_len", 1, ctx)
    batch = Dim("batch", 1, 2)
    cache = (d.num_hidden_layers, 1, d.num_key_value_heads, d.max_position_embeddings, d.head_dim)
    cfg_cache = (d.num_hidden_layers, 2, *cache[2:])
    latent = (cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    specs = [
        GraphSpec("tokenizer", "tokenizer",
                  inputs=(TensorSpec("pixels", (1, 3, hw, hw)),),
                  outputs=(TensorSpec("image_embeds", (1, n, width)), TensorSpec("image_ids", (1, n), "int32")),
                  build=_Tokenizer),
        GraphSpec("embed_tokens", "decoder",
                  inputs=(TensorSpec("tokens", (1, seq), "int32"),),
                  outputs=(TensorSpec("embeds", (1, seq, width)),),
                  build=_Embed),
        GraphSpec("decoder", "decoder",
                  inputs=(TensorSpec("inputs_embeds", (1, seq, width)),
                          TensorSpec("causal_mask", (1, 1, seq, end), allow_inf=True)),
                  # The last position's logits only, prefill included: generation reads no other
                  # row, and a T-token prefill then projects onto the vocabulary once, not T times.
                  outputs=(TensorSpec("logits", (1, 1, cfg.vocab_size)),),
                  states=(TensorSpec("k_cache", cache), TensorSpec("v_cache", cache)),
                  build=lambda m: StatefulDecoder(m.decoder, last_logits=True),
                  build_explicit=lambda m: ExplicitKVDecoder(m.decoder, last_logits=True),
                  build_executorch=lambda m: InPlaceKVDecoder(m.decoder, last_logits=True)),
        # Image-token CFG: the conditional and unconditional rows decode as one batch of 2,
        # the shorter row left-padded and masked per row (`padded_causal_mask`).
        GraphSpec("decoder_cfg", "decoder",
                  inputs=(TensorSpec("inputs_embeds", (2, seq, width)),
                          TensorSpec("causal_mask", (2, 1, seq, end), allow_inf=True)),
                  outputs=(TensorSpec("logits", (2, 1, cfg.vocab_size)),),
                  states=(TensorSpec("k_cache", cfg_cache), TensorSpec("v_cache", cfg_cache)),
                  build=lambda m: StatefulDecoder(m.decoder, batch_size=2, last_logits=True),
                  build_explicit=lambda m: ExplicitKVDecoder(m.decoder, last_logits=True),
                  build_executorch=lambda m: InPlaceKVDecoder(m.decoder, last_logits=True, batch_size=2),
                  optional=True),
        GraphSpec("code_features", "diffusion",
                  inputs=(TensorSpec("image_ids", (1, n), "int32"),),
                  outputs=(TensorSpec("condition", (1, n, width)),),
                  build=_CodeFeatures),
        GraphSpec("dit", "diffusion",
                  inputs=(TensorSpec("latent", (batch, *latent)), TensorSpec("timestep", (batch,)),
                          TensorSpec("condition", (batch, n, width))),
                  outputs=(TensorSpec("velocity", (batch, *latent)),),
                  build=_DiT),
        GraphSpec("vae_decoder", "diffusion",
                  inputs=(TensorSpec("latent", (1, *latent)),),
                  outputs=(TensorSpec("pixels", (1, 3, hw, hw)),),
                  build=lambda m: m.vae.decoder),
    ]
    return {s.name: s for s in specs}


# -- real example inputs -----------------------------------------------------------------------
EXAMPLE_TOKEN_GUIDANCE = 3.0


def guided_steps(model: Manzano, prompt_ids: list[int], decode_steps: int) -> list[dict[str, torch.Tensor]]:
    """decoder_cfg's steps, as the runtime feeds them: [prompt, unconditional prompt] left-padded
    into one batch, then each guided greedy token fed to both rows."""
    t = model.cfg.text
    tokens, pad = left_pad(guidance_rows(prompt_ids, t.bos_id, t.img_start_id), t.pad_id)
    width = tokens.shape[1]
    steps = [{"inputs_embeds": model.decoder.embed(tokens), "causal_mask": padded_causal_mask(pad, 0, width)}]
    decoder = StatefulDecoder(model.decoder, batch_size=2, last_logits=True).eval()
    logits = decoder(**steps[0])[:, -1]
    for i in range(decode_steps):
        nxt = guided_logits(logits, EXAMPLE_TOKEN_GUIDANCE).argmax(-1).view(1, 1).expand(2, 1)
        steps.append({"inputs_embeds": model.decoder.embed(nxt), "causal_mask": padded_causal_mask(pad, width + i, 1)})
        logits = decoder(**steps[-1])[:, -1]
    return steps


@dataclass
class Examples:
    """Real inputs per graph (scenes from the generator, real prompts): the trace example is
    the first, parity runs over all. The decoder's entry is a sequence of steps: a prefill
    followed by decode steps fed with the model's own greedy tokens."""

    per_graph: dict[str, list[dict[str, torch.Tensor]]]


@torch.no_grad()
def real_examples(model: Manzano, codec: TextCodec, decode_steps: int = 16, seed: int = 7) -> Examples:
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    scene_list = [scenes.sample_scene(rng) for _ in range(2)]
    pixels = [to_pixels(scenes.render(s, cfg.vision.image_size), cfg.vision.image_size) for s in scene_list]
    embeds, ids = model.tokenizer(pixels[0])
    prompt = scenes.generation_prompt(scene_list[1], rng)
    t = cfg.text
    tokens = torch.tensor([[t.bos_id, *codec.encode(prompt), t.img_start_id]], dtype=torch.int32)
    prefill = model.decoder.embed(tokens.long())
    steps = [{"inputs_embeds": prefill, "causal_mask": causal_mask(0, prefill.shape[1])}]
    stateful = StatefulDecoder(model.decoder).eval()
    logits = stateful(prefill, steps[0]["causal_mask"])
    past = prefill.shape[1]
    for _ in range(decode_steps):
        nxt = logits[:, -1:].argmax(-1)
        step = {"inputs_embeds": model.decoder.embed(nxt), "causal_mask": causal_mask(past, 1)}
        steps.append(step)
        logits = stateful(**step)
        past += 1
    cfg_steps = guided_steps(model, tokens[0].tolist(), decode_steps)
    cond = model.tokenizer.discrete.ids_to_features(ids)
    latent = model.vae.encoder(pixels[1])[0] * cfg.vae.scaling_factor
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    x_t = 0.5 * noise + 0.5 * latent
    return Examples({
        "tokenizer": [{"pixels": p} for p in pixels],
        "embed_tokens": [{"tokens": tokens}],
        "decoder": steps,
        "decoder_cfg": cfg_steps,
        "code_features": [{"image_ids": ids.to(torch.int32)}],
        # The CFG batch of 2 comes first: tracing with batch 1 would make torch.export
        # specialise the dynamic batch dim to 1 (0/1 specialisation).
        "dit": [{"latent": torch.cat([x_t, noise]), "timestep": torch.tensor([0.5, 0.1]),
                 "condition": torch.cat([cond, model.dit.unconditional(1, cond.shape[1])])},
                {"latent": x_t, "timestep": torch.tensor([0.5]), "condition": cond}],
        "vae_decoder": [{"latent": latent / cfg.vae.scaling_factor}],
    })
