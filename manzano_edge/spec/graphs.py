"""The on-device contract: every graph declared once.

A `GraphSpec` names the module to export, its inputs/outputs (name, shape with named
dynamic dims, dtype), its KV-cache states and the state layouts it can be built in. The
exporters, the bundle manifest, the runtime's input checks, the validator and the benchmark
all read these declarations; none re-declares shapes, and no backend is named here: an
exporter asks for the layout its runtime needs (`StateLayout`).

Graphs (loops stay in the runtime):
- tokenizer:      pixels -> continuous image embeddings (understanding) and discrete ids
                  (generation). One graph with two outputs: both branches share the ViT, so
                  one graph runs the encoder once and ships its weights once.
- embed_tokens:   token ids -> embeddings (the decoder takes embeddings so image embeddings
                  can be spliced in, as ExecuTorch's LLaVA export does).
- decoder:        one prefill-or-decode step with a KV cache. `causal_mask` [B,1,T,E]
                  carries the cache length E after the step, so one graph does prefill
                  (T>1) and decode (T=1). A runtime with state keeps the cache inside
                  the graph; one without passes it as k_cache/v_cache inputs and *_out
                  outputs (`StateLayout.EXPLICIT`).
- code_features:  image-code ids -> discrete-adapter features (the DiT's condition).
- dit:            one flow-matching velocity evaluation; batch 1 or 2 (CFG).
- vae_decoder:    latent -> pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from manzano_edge.config import ModelConfig
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano
from manzano_edge.spec import modules

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64,
          "uint8": torch.uint8}


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
    # An RGB image as float pixels (data.images: x = u / 127.5 - 1 of 8-bit u), which a format with an
    # image type (Core ML's ImageType) takes as an image.
    image: bool = False

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


class StateLayout:
    """How a graph's states are laid out in one build of its module.

    - STATEFUL: the reference build; states are module buffers (mutable state in the graph).
    - EXPLICIT: states are inputs, and their next values `*_out` outputs (a runtime without state).
    - INPLACE: per-layer state buffers written by in-place kernels; same I/O and numbers as STATEFUL.
    """

    STATEFUL = "stateful"
    EXPLICIT = "explicit"
    INPLACE = "inplace"


class Convention:
    """Another runtime's I/O convention for the same computation (`GraphSpec.variants`).

    - STOCK_VLM: the vision -> embedding -> decoder split of the stock VLM runtimes: `pixel_values`
      -> 2-D `image_features`; `input_ids` with negative image slots + `image_features` ->
      `inputs_embeds`; a decoder with an integer `attention_mask` and one cache tensor per layer
      (`past_key_values.{i}.key/value` in, `present.{i}.key/value` out).
    """

    STOCK_VLM = "stock_vlm"
    # The methods of one program for ExecuTorch's LLM runners: `vision_encoder` (uint8 image ->
    # embeddings), `token_embedding`, `text_decoder` (embeddings + `input_pos`) and, for the text-only
    # runner, `forward` (token ids + `input_pos`); the KV cache is the program's state.
    STOCK_LLM_RUNNER = "stock_llm_runner"
    STOCK_TEXT_RUNNER = "stock_text_runner"
    # Apple's Core ML LLM convention (swift-transformers' `LanguageModel`, Apple's "On Device Llama 3.1
    # with Core ML"): `inputIds` int32 [1, T] (APPLE_LLM) or `inputsEmbeds` fp16 [1, T, D]
    # (APPLE_LLM_EMBEDS), an fp16 additive `causalMask` [1, 1, T, E], the cache in the fp16 states
    # `keyCache` / `valueCache`, and fp16 `logits` [1, T, V] of every new position.
    APPLE_LLM = "apple_llm"
    APPLE_LLM_EMBEDS = "apple_llm_embeds"


@dataclass
class GraphVariant:
    """One graph in another I/O convention: the file the runtime looks for, its I/O and its module.
    Its numbers are the graph's own (the exporter checks parity against the reference build)."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[Manzano], nn.Module]
    # States the file declares (Core ML's); the stock runners keep theirs inside the program, out of its I/O.
    states: tuple[TensorSpec, ...] = ()

    def manifest_io(self, dims: dict[str, Dim]) -> dict:
        used = {d.name for t in (*self.inputs, *self.outputs) for d in t.shape if isinstance(d, Dim)}
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "states": [t.to_json() for t in self.states],
                "dynamic_dims": {n: {"min": d.min, "max": d.max} for n, d in dims.items() if n in used}}


class GraphKind:
    """What a graph computes, for the code that drives it (metrics, benchmarks, examples)."""

    IMAGE_TOKENIZER = "image_tokenizer"
    TOKEN_EMBEDDING = "token_embedding"
    LM_STEP = "lm_step"  # one prefill-or-decode step of the decoder, batch 1
    GUIDED_LM_STEP = "guided_lm_step"  # the same step on the two rows of image-token CFG
    CODE_FEATURES = "code_features"
    DENOISER_STEP = "denoiser_step"  # one flow-matching velocity, batch 1 or 2 (CFG)
    LATENT_DECODER = "latent_decoder"


@dataclass
class GraphSpec:
    name: str
    family: str  # tokenizer | decoder | diffusion
    kind: str  # GraphKind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[Manzano], nn.Module]  # the StateLayout.STATEFUL build: the reference every format is checked against
    states: tuple[TensorSpec, ...] = ()
    # Other state layouts of the same step (StateLayout -> builder); a layout not listed builds `build`.
    layouts: dict[str, Callable[[Manzano], nn.Module]] = field(default_factory=dict)
    # Not in the default export set, and the runtime runs without it (a feature needs it).
    optional: bool = False
    # The same step in other runtimes' I/O conventions (`Convention` -> variant).
    variants: dict[str, GraphVariant] = field(default_factory=dict)
    # What the graph and each of its inputs, outputs and states mean, for the files' own metadata.
    summary: str = ""
    docs: dict[str, str] = field(default_factory=dict)
    dims: dict[str, Dim] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in (*self.inputs, *self.outputs, *self.states):
            for d in t.shape:
                if isinstance(d, Dim):
                    self.dims[d.name] = d
        self.variant_dims: dict[str, Dim] = {}
        for v in self.variants.values():
            for t in (*v.inputs, *v.outputs):
                for d in t.shape:
                    if isinstance(d, Dim):
                        self.variant_dims[d.name] = d

    def float_outputs(self) -> GraphSpec:
        """This declaration without its integer outputs: what a variant that computes only the
        understanding branch (the stock runners' vision graphs) is checked on."""
        return replace(self, outputs=tuple(t for t in self.outputs if t.dtype.startswith("float")))

    def has_layout(self, layout: str) -> bool:
        return layout in self.layouts

    def io(self, layout: str = StateLayout.STATEFUL) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs/outputs as a build sees them: with EXPLICIT state the states become inputs and
        `*_out` outputs."""
        if layout != StateLayout.EXPLICIT or not self.states:
            return self.inputs, self.outputs
        outs = tuple(TensorSpec(f"{s.name}_out", s.shape, s.dtype) for s in self.states)
        return self.inputs + self.states, self.outputs + outs

    def manifest_io(self, layout: str = StateLayout.STATEFUL) -> dict:
        inputs, outputs = self.io(layout)
        return {"inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs],
                "states": [] if layout == StateLayout.EXPLICIT else [t.to_json() for t in self.states],
                "dynamic_dims": {d.name: {"min": d.min, "max": d.max} for d in self.dims.values()}}

    def check_inputs(self, values: dict[str, torch.Tensor], layout: str = StateLayout.STATEFUL) -> None:
        inputs, _ = self.io(layout)
        missing = [t.name for t in inputs if t.name not in values]
        if missing:
            raise UserError(f"{self.name}: missing input(s) {missing}")
        for t in inputs:
            t.check(values[t.name], self.name)


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
    # The stock VLM convention: a cache that grows by concatenation, from empty (past = 0).
    past, total = Dim("past", 0, ctx - 1), Dim("total", 1, ctx)
    image_rows = Dim("image_rows", 0, ctx)
    per_layer = [f"{i}.{kv}" for i in range(d.num_hidden_layers) for kv in ("key", "value")]
    past_kv = tuple(TensorSpec(f"past_key_values.{n}", (1, d.num_key_value_heads, past, d.head_dim)) for n in per_layer)
    present_kv = tuple(TensorSpec(f"present.{n}", (1, d.num_key_value_heads, total, d.head_dim)) for n in per_layer)
    vision_variants = {
        Convention.STOCK_VLM: GraphVariant("vision", inputs=(TensorSpec("pixel_values", (1, 3, hw, hw)),),
                                           outputs=(TensorSpec("image_features", (n, width)),),
                                           build=modules.VisionFeatures),
        Convention.STOCK_LLM_RUNNER: GraphVariant("vision_encoder", inputs=(TensorSpec("image", (1, 3, hw, hw), "uint8"),),
                                                  outputs=(TensorSpec("image_embeds", (1, n, width)),),
                                                  build=modules.ImageEmbeddings)}
    embedding_variants = {
        Convention.STOCK_VLM: GraphVariant("embedding", inputs=(TensorSpec("input_ids", (1, seq), "int64"),
                                                                TensorSpec("image_features", (image_rows, width))),
                                           outputs=(TensorSpec("inputs_embeds", (1, seq, width)),),
                                           build=modules.SplicingEmbedding),
        Convention.STOCK_LLM_RUNNER: GraphVariant("token_embedding", inputs=(TensorSpec("tokens", (1, seq), "int64"),),
                                                  outputs=(TensorSpec("embeds", (1, seq, width)),), build=modules.EmbedGraph)}
    last_logits = (TensorSpec("logits", (1, 1, cfg.vocab_size)),)
    position = TensorSpec("input_pos", (1,), "int64")
    decoder_variants = {
        Convention.STOCK_VLM: GraphVariant("decoder", inputs=(TensorSpec("inputs_embeds", (1, seq, width)),
                                                              TensorSpec("attention_mask", (1, total), "int64"), *past_kv),
                                           outputs=(*last_logits, *present_kv),
                                           build=lambda m: modules.PerLayerKVDecoder(m.decoder)),
        Convention.STOCK_LLM_RUNNER: GraphVariant("text_decoder", inputs=(TensorSpec("inputs_embeds", (1, seq, width)), position),
                                                  outputs=last_logits,
                                                  build=lambda m: modules.PositionedKVDecoder(m.decoder, takes_tokens=False)),
        Convention.STOCK_TEXT_RUNNER: GraphVariant("forward", inputs=(TensorSpec("tokens", (1, seq), "int64"), position),
                                                   outputs=last_logits,
                                                   build=lambda m: modules.PositionedKVDecoder(m.decoder, takes_tokens=True))}
    apple_mask = TensorSpec("causalMask", (1, 1, seq, end), "float16", allow_inf=True)
    apple_io = {"outputs": (TensorSpec("logits", (1, seq, cfg.vocab_size), "float16"),),
                "states": (TensorSpec("keyCache", cache, "float16"), TensorSpec("valueCache", cache, "float16"))}
    decoder_variants[Convention.APPLE_LLM] = GraphVariant(
        "decoder", inputs=(TensorSpec("inputIds", (1, seq), "int32"), apple_mask), **apple_io,
        build=lambda m: modules.AppleLLMDecoder(m.decoder, takes_tokens=True))
    decoder_variants[Convention.APPLE_LLM_EMBEDS] = GraphVariant(
        "decoder", inputs=(TensorSpec("inputsEmbeds", (1, seq, width), "float16"), apple_mask), **apple_io,
        build=lambda m: modules.AppleLLMDecoder(m.decoder, takes_tokens=False))
    specs = [
        GraphSpec("tokenizer", "tokenizer", GraphKind.IMAGE_TOKENIZER,
                  inputs=(TensorSpec("pixels", (1, 3, hw, hw), image=True),),
                  outputs=(TensorSpec("image_embeds", (1, n, width)), TensorSpec("image_ids", (1, n), "int32")),
                  build=modules.TokenizerGraph,
                  summary="hybrid vision tokenizer: understanding embeddings and generation codes of one image",
                  docs={"pixels": "RGB image, NCHW, in [-1, 1] (x / 127.5 - 1)",
                        "image_embeds": "continuous-adapter embeddings, spliced into the decoder's prompt",
                        "image_ids": "FSQ codes of the discrete adapter (image token = code + image_token_offset)"},
                  variants=vision_variants),
        GraphSpec("embed_tokens", "decoder", GraphKind.TOKEN_EMBEDDING,
                  inputs=(TensorSpec("tokens", (1, seq), "int32"),),
                  outputs=(TensorSpec("embeds", (1, seq, width)),),
                  build=modules.EmbedGraph,
                  summary="token embedding lookup of the joint text + image-code vocabulary",
                  docs={"tokens": "token ids", "embeds": "their embeddings, the decoder's inputs_embeds"},
                  variants=embedding_variants),
        GraphSpec("decoder", "decoder", GraphKind.LM_STEP,
                  inputs=(TensorSpec("inputs_embeds", (1, seq, width)),
                          TensorSpec("causal_mask", (1, 1, seq, end), allow_inf=True)),
                  # The last position's logits only, prefill included: generation reads no other
                  # row, and a T-token prefill then projects onto the vocabulary once, not T times.
                  outputs=(TensorSpec("logits", (1, 1, cfg.vocab_size)),),
                  states=(TensorSpec("k_cache", cache), TensorSpec("v_cache", cache)),
                  build=lambda m: modules.StatefulDecoder(m.decoder, last_logits=True),
                  summary="Llama-style decoder step (prefill T > 1 or decode T = 1) with its KV cache as state",
                  docs={"inputs_embeds": "embeddings of the T new positions (text, spliced image rows, or one token)",
                        "causal_mask": "additive mask [B, 1, T, E]: 0 where key k <= past + q, -inf elsewhere; "
                                       "E = past + T is the cache length after the step",
                        "logits": "next-token logits of the last position",
                        "k_cache": "keys of every layer (state)", "v_cache": "values of every layer (state)"},
                  layouts={StateLayout.EXPLICIT: lambda m: modules.ExplicitKVDecoder(m.decoder, last_logits=True),
                           StateLayout.INPLACE: lambda m: modules.InPlaceKVDecoder(m.decoder, last_logits=True)},
                  variants=decoder_variants),
        # Image-token CFG: the conditional and unconditional rows decode as one batch of 2,
        # the shorter row left-padded and masked per row (`padded_causal_mask`).
        GraphSpec("decoder_cfg", "decoder", GraphKind.GUIDED_LM_STEP,
                  inputs=(TensorSpec("inputs_embeds", (2, seq, width)),
                          TensorSpec("causal_mask", (2, 1, seq, end), allow_inf=True)),
                  outputs=(TensorSpec("logits", (2, 1, cfg.vocab_size)),),
                  states=(TensorSpec("k_cache", cfg_cache), TensorSpec("v_cache", cfg_cache)),
                  build=lambda m: modules.StatefulDecoder(m.decoder, batch_size=2, last_logits=True),
                  summary="the decoder step on the two rows of image-token guidance (conditional, unconditional)",
                  docs={"inputs_embeds": "embeddings of the T new positions (text, spliced image rows, or one token)",
                        "causal_mask": "additive mask [B, 1, T, E]: 0 where key k <= past + q, -inf elsewhere; "
                                       "E = past + T is the cache length after the step",
                        "logits": "next-token logits of the last position",
                        "k_cache": "keys of every layer (state)", "v_cache": "values of every layer (state)"},
                  layouts={StateLayout.EXPLICIT: lambda m: modules.ExplicitKVDecoder(m.decoder, last_logits=True),
                           StateLayout.INPLACE: lambda m: modules.InPlaceKVDecoder(m.decoder, last_logits=True,
                                                                                   batch_size=2)},
                  optional=True),
        GraphSpec("code_features", "diffusion", GraphKind.CODE_FEATURES,
                  inputs=(TensorSpec("image_ids", (1, n), "int32"),),
                  outputs=(TensorSpec("condition", (1, n, width)),),
                  build=modules.CodeFeaturesGraph,
                  summary="image codes to discrete-adapter features: the DiT's condition",
                  docs={"image_ids": "image codes (token - image_token_offset)", "condition": "the DiT's condition"}),
        GraphSpec("dit", "diffusion", GraphKind.DENOISER_STEP,
                  inputs=(TensorSpec("latent", (batch, *latent)), TensorSpec("timestep", (batch,)),
                          TensorSpec("condition", (batch, n, width))),
                  outputs=(TensorSpec("velocity", (batch, *latent)),),
                  build=modules.DiTGraph,
                  summary="one flow-matching velocity of the DiT (batch 2: conditional and null condition)",
                  docs={"latent": "the latent x at time t", "timestep": "t in [0, 1): 0 is noise, 1 the image",
                        "condition": "code_features' condition, or the null condition for guidance",
                        "velocity": "dx/dt; an Euler step is x + velocity / steps"}),
        GraphSpec("vae_decoder", "diffusion", GraphKind.LATENT_DECODER,
                  inputs=(TensorSpec("latent", (1, *latent)),),
                  outputs=(TensorSpec("pixels", (1, 3, hw, hw)),),
                  build=lambda m: m.vae.decoder,
                  summary="VAE decoder: latent to pixels",
                  docs={"latent": "the flow's final latent divided by the VAE scaling factor",
                        "pixels": "RGB image, NCHW, in [-1, 1] before clamping"}),
    ]
    return {s.name: s for s in specs}


