"""Model configuration: dataclasses serialised to JSON, plus the named presets.

Every Linear input width is a multiple of 32 (int4 group-32 quantization on XNNPACK and
Core ML needs it) and the ViT patch grid is divisible by 3 (3x3 spatial-to-channel folding).
`ModelConfig.validate()` enforces both, so a preset or a user config that breaks them
fails at load time instead of at export time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from manzano_edge.errors import UserError

LINEAR_ALIGN = 32
STC_FACTOR = 3
VIT_ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")

# Sampling defaults of the command line, the Python runtime and the bundle's pipeline contract.
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_FLOW_STEPS = 20


@dataclass
class VisionConfig:
    image_size: int = 96
    patch_size: int = 8
    width: int = 96
    layers: int = 4
    heads: int = 3
    mlp_ratio: int = 4
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    # Two stride-2 3x3 convs before a (patch/4)-sized patchify: early convolutions make a small
    # from-scratch ViT learn local shape much faster (plain patch-8 ViTs stalled on shape).
    conv_stem: list[int] = field(default_factory=list)
    # The pretrained towers' variations (manzano_edge.models.hf_vision): MLP width (None: width *
    # mlp_ratio), activation ("gelu_tanh" | "gelu" | "quick_gelu"), LayerNorm eps, CLIP's class token
    # and norm before the blocks, and whether the last block's output is normed (not in CLIP).
    intermediate_size: int | None = None
    hidden_act: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    class_token: bool = False
    pre_norm: bool = False
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = self.width * self.mlp_ratio

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return (self.grid // STC_FACTOR) ** 2

    @property
    def stc_width(self) -> int:
        return self.width * STC_FACTOR * STC_FACTOR

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels)


# Hugging Face rope_scaling types the decoder computes, with the keys each one needs. "dynamic" (NTK)
# changes nothing until a sequence passes original_max_position_embeddings, so it maps only where the
# decoder's position table stops there.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "dynamic": ("factor",),
}


def rope_scaling_problems(scaling: dict | None, max_positions: int | None = None) -> list[str]:
    if not scaling:
        return []
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        return [f"rope_scaling type {kind!r} is not implemented (supported: {', '.join(ROPE_SCALING_KEYS)})"]
    missing = [k for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is None]
    if missing:
        return [f"rope_scaling '{kind}' lacks {', '.join(missing)}"]
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        return ["rope_scaling with partial_rotary_factor != 1 (RoPE on part of each head) is not implemented"]
    original = scaling.get("original_max_position_embeddings")
    if kind == "dynamic" and max_positions is not None and original is not None and original < max_positions:
        return [f"dynamic NTK RoPE rescales past position {original}, and the decoder's table runs to "
                f"{max_positions}; set max_position_embeddings to {original} or use a checkpoint without it"]
    return []


@dataclass
class DecoderConfig:
    """Llama-architecture decoder. Field names follow Hugging Face `LlamaConfig`; the Llama
    family's variations (Qwen2's q/k/v biases, Qwen3's per-head q/k norms, scaled RoPE) are
    switches here, so an imported checkpoint keeps every tensor it has."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # None: hidden_size // num_attention_heads (Qwen3 and Mistral checkpoints set their own).
    head_dim: int | None = None
    # Biases on q/k/v (Qwen2: True), on o_proj, and on the MLP's three projections.
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    # RMSNorm over each head's q and k before RoPE (Qwen3).
    qk_norm: bool = False
    # Hugging Face's rope scaling dict ({"rope_type": "linear" | "llama3" | "yarn", ...}); None: plain RoPE.
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class DiTConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    patch_size: int = 2
    # DiT-Air: one adaLN modulation network shared by every block.
    share_adaln: bool = True
    # How the image tokens' condition is spread over the latent patches ("bilinear" | "nearest").
    # Bilinear (the default, and what configs without the key were trained with) blends
    # neighbouring tokens at every patch; where each token is one scene cell that blurs the
    # edge patches of every object, so the tiny preset uses "nearest".
    cond_resample: str = "bilinear"


@dataclass
class VAEConfig:
    latent_channels: int = 8
    channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    # Latents are multiplied by this so they have roughly unit variance for the DiT;
    # measured on training data after the VAE stage.
    scaling_factor: float = 1.0

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)


@dataclass
class TextConfig:
    """The joint vocabulary: text tokens [0, text_vocab_size), then one id per image code."""

    text_vocab_size: int = 512
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    sep_id: int = 3
    img_start_id: int = 4
    img_end_id: int = 5


@dataclass
class ModelConfig:
    name: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def image_token_offset(self) -> int:
        return self.text.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text.text_vocab_size + self.vision.codebook_size

    @property
    def latent_size(self) -> int:
        return self.vision.image_size // self.vae.downsample

    def validate(self) -> ModelConfig:
        v, d, t = self.vision, self.decoder, self.dit
        problems = []
        if v.image_size % v.patch_size:
            problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.conv_stem and (len(v.conv_stem) != 2 or v.patch_size % 4):
            problems.append("conv_stem takes two widths and needs patch_size divisible by 4")
        if v.grid % STC_FACTOR:
            problems.append(f"ViT grid {v.grid} is not divisible by {STC_FACTOR} (needed for STC)")
        widths = {
            "vision.width": v.width,
            "vision.intermediate_size": v.intermediate_size,
            "vision.patch_size^2*3": 3 * v.patch_size**2,
            "decoder.hidden_size": d.hidden_size,
            "decoder.intermediate_size": d.intermediate_size,
            "dit.width": t.width,
            "dit.patch_size^2*latent_channels": t.patch_size**2 * self.vae.latent_channels,
        }
        problems += [f"{k}={w} is not a multiple of {LINEAR_ALIGN}" for k, w in widths.items() if w % LINEAR_ALIGN]
        if d.num_attention_heads % d.num_key_value_heads:
            problems.append("decoder num_attention_heads must be a multiple of num_key_value_heads")
        if d.head_dim % 2:
            problems.append(f"decoder head_dim {d.head_dim} must be even (RoPE rotates pairs)")
        if (d.num_attention_heads * d.head_dim) % LINEAR_ALIGN:
            problems.append(f"decoder num_attention_heads*head_dim={d.num_attention_heads * d.head_dim} "
                            f"is not a multiple of {LINEAR_ALIGN}")
        problems += rope_scaling_problems(d.rope_scaling, d.max_position_embeddings)
        if v.hidden_act not in VIT_ACTIVATIONS:
            problems.append(f"vision.hidden_act {v.hidden_act!r} is not one of {', '.join(VIT_ACTIVATIONS)}")
        if v.width % v.heads or t.width % t.heads:
            problems.append("vision/dit heads must divide their width")
        if v.image_size % self.vae.downsample or self.latent_size % t.patch_size:
            problems.append("image_size must be divisible by the VAE downsample and the DiT patch size")
        if t.cond_resample not in ("bilinear", "nearest"):
            problems.append(f"dit.cond_resample must be 'bilinear' or 'nearest', got {t.cond_resample!r}")
        if problems:
            raise UserError(f"invalid model config '{self.name}': " + "; ".join(problems))
        return self

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        try:
            return cls(
                name=raw["name"],
                vision=VisionConfig(**raw["vision"]),
                decoder=DecoderConfig(**raw["decoder"]),
                dit=DiTConfig(**raw["dit"]),
                vae=VAEConfig(**raw["vae"]),
                text=TextConfig(**raw["text"]),
            ).validate()
        except (KeyError, TypeError) as exc:
            raise UserError(f"config is not a manzano-edge ModelConfig ({exc}); re-create it with `manzano-edge train`") from exc

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise UserError(f"config file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"config file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_dict(raw)


def _tiny() -> ModelConfig:
    # 144 px / patch 16: a 9x9 ViT grid folds into 3x3 image tokens, one per scene cell, so each
    # token describes a whole object. At 96 px (4x4 tokens) objects straddled 2-4 tokens, each
    # holding an edge fragment, and the codes carried too little shape to draw from.
    return ModelConfig(name="tiny", vision=VisionConfig(image_size=144, patch_size=16, conv_stem=[24, 48]),
                       dit=DiTConfig(cond_resample="nearest"))


def _small() -> ModelConfig:
    # Tens of millions of parameters: sized for benchmarks, random weights are fine.
    return ModelConfig(
        name="small",
        vision=VisionConfig(image_size=192, patch_size=16, width=384, layers=6, heads=6, fsq_levels=[8, 8, 8, 5]),
        decoder=DecoderConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                              intermediate_size=1536, max_position_embeddings=256),
        dit=DiTConfig(width=384, depth=8, heads=6, patch_size=2),
        vae=VAEConfig(latent_channels=8, channels=[64, 128, 128]),
        text=TextConfig(text_vocab_size=4096),
    )


def _manzano_300m() -> ModelConfig:
    # Paper-shaped: ~300M decoder (tied embeddings, 64K image codes), ViT-L/16 at 384 px
    # (24x24 grid -> 8x8 = 64 image tokens), ~0.9B DiT. Random weights: export/latency only.
    # Patch 16 rather than the paper's 14 keeps the patch projection (16*16*3=768) 32-aligned.
    return ModelConfig(
        name="manzano-300m",
        vision=VisionConfig(image_size=384, patch_size=16, width=1024, layers=24, heads=16,
                            fsq_levels=[8, 8, 8, 5, 5, 5]),
        decoder=DecoderConfig(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                              intermediate_size=2816, max_position_embeddings=1024, tie_word_embeddings=True),
        dit=DiTConfig(width=1536, depth=24, heads=24, patch_size=2, share_adaln=True),
        vae=VAEConfig(latent_channels=16, channels=[128, 256, 512]),
        text=TextConfig(text_vocab_size=32000),
    )


PRESETS = {"tiny": _tiny, "small": _small, "manzano-300m": _manzano_300m}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]().validate()
