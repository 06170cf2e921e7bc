"""Use a local Hugging Face decoder checkpoint (config.json + *.safetensors + tokenizer.json) as the
unified decoder's backbone: Llama (and SmolLM), Mistral, Qwen2/Qwen2.5 and Qwen3.

Parameter names map 1:1 (`model.` prefix dropped). Every checkpoint tensor is accounted for: an
import fails, naming the tensor and the architecture feature it implies, when one is left over
or missing, so a checkpoint never loads into a decoder that lacks one of its parts.

The vocabulary is extended, as in the paper, with <sep>, <img_start>, <img_end> (added to
tokenizer.json) and one row per image code; new rows start at the mean of the existing
embeddings plus small noise. Nothing is downloaded: the directory must already be on disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from manzano_edge.config import DecoderConfig, TextConfig, rope_scaling_problems
from manzano_edge.errors import UserError
from manzano_edge.models.decoder import LlamaDecoder, rope_inv_freq
from manzano_edge.models.manzano import load_state

NEW_SPECIALS = ("<sep>", "<img_start>", "<img_end>")

# model_type -> the switches its modeling code hard-codes (the rest come from config.json).
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True, "attention_out_bias": False},
    "qwen3": {"qk_norm": True},
}

# Parts of checkpoints the decoder does not have, by a name fragment, for the refusal's wording.
UNMAPPED_FEATURES = (
    ("q_norm", "per-head q/k RMSNorm (Qwen3-style); is config.json's model_type right?"),
    ("k_norm", "per-head q/k RMSNorm (Qwen3-style); is config.json's model_type right?"),
    ("qkv_proj", "a fused q/k/v projection (Phi-3-style), which the decoder keeps as three"),
    ("gate_up_proj", "a fused gate/up projection (Phi-3-style), which the decoder keeps as two"),
    (".bias", "a bias that config.json does not declare (attention_bias / mlp_bias)"),
)


def decoder_config_from_hf(raw: dict) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face config.json; refuses, by name, what does not map."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"config.json describes a '{model_type}' model; the decoder imports "
                        f"{', '.join(ARCHITECTURES)} checkpoints")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json's hidden_act is '{raw['hidden_act']}'; the decoder's MLP is SwiGLU (silu)")
    _refuse_sliding_window(raw)
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older files use rope_theta/rope_scaling.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or rope
    scaling = dict(scaling) if scaling.get("rope_type", scaling.get("type", "default")) != "default" else None
    problems = rope_scaling_problems(scaling, raw.get("max_position_embeddings"))
    if problems:
        raise UserError(f"config.json: {problems[0]}")
    try:
        switches = {"attention_bias": bool(raw.get("attention_bias", False)),
                    "attention_out_bias": bool(raw.get("attention_bias", False)),
                    "mlp_bias": bool(raw.get("mlp_bias", False)), **ARCHITECTURES[model_type]}
        return DecoderConfig(
            hidden_size=raw["hidden_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"], max_position_embeddings=raw["max_position_embeddings"],
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            head_dim=raw.get("head_dim"), rope_scaling=scaling, **switches)
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc}; is this a Hugging Face {model_type} checkpoint?") from exc


def _refuse_sliding_window(raw: dict) -> None:
    """Sliding-window attention changes nothing while every sequence fits in the window."""
    window = raw.get("sliding_window")
    uses_it = raw.get("use_sliding_window", raw.get("model_type") == "mistral")
    if uses_it and window is not None and window < raw.get("max_position_embeddings", 0):
        raise UserError(f"config.json uses sliding-window attention ({window} positions, below "
                        f"max_position_embeddings {raw['max_position_embeddings']}), which the decoder does not "
                        f"implement; set max_position_embeddings to {window} or use_sliding_window to false")


def hf_to_decoder_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`; `lm_head` and
    anything outside `model.` keep their names (so the accounting sees them)."""
    return {name.removeprefix("model."): tensor for name, tensor in hf_state.items()}


def load_hf_decoder_state(decoder: LlamaDecoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` (decoder names) into `decoder`, every tensor accounted for: derived RoPE buffers
    must match the config, a tied lm_head must equal the embedding, nothing is left over or missing."""
    state = dict(state)
    cfg = decoder.cfg
    for name in [n for n in state if n.endswith("rotary_emb.inv_freq")]:
        stored = state.pop(name).float()
        if not torch.allclose(stored, rope_inv_freq(cfg)[0], rtol=1e-4, atol=1e-7):
            raise UserError(f"{source}: {name} differs from the RoPE that config.json describes (rope_theta, "
                            "rope_scaling); the config does not belong to these weights")
    if cfg.tie_word_embeddings:
        head, embed = state.pop("lm_head.weight", None), state.get("embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed[:head.shape[0]].to(head.dtype)):
            raise UserError(f"{source}: lm_head.weight differs from embed_tokens.weight but config.json says "
                            "tie_word_embeddings; set it to false")
    expected = {k: v for k, v in decoder.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    extra = sorted(n for n in state if n not in expected)
    if extra:
        feature = next((why for part, why in UNMAPPED_FEATURES if part in extra[0]), "a part the Llama-family decoder "
                       "does not have")
        raise UserError(f"{source}: tensor '{extra[0]}' maps to nothing in the decoder: it implies {feature} "
                        f"({len(extra)} unmapped tensor(s))")
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{source} lacks '{missing[0]}' ({len(missing)} missing tensor(s)); is it a complete "
                        "checkpoint of the model config.json describes?")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{source}: '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(expected[name].shape)}")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" ({pickled[0]} is a pickle, which is never loaded)" if pickled else ""
        raise UserError(f"no *.safetensors in {directory}{hint}; save it with save_pretrained(safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state(f))
    return state


def _extend_rows(weight: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    mean, std = weight.float().mean(0), weight.float().std(0).mean()
    new = mean + torch.randn(rows, weight.shape[1], generator=generator) * std * 0.1
    return torch.cat([weight.float(), new])


def _special_id(raw: dict, generation: dict, key: str) -> int | None:
    """config.json's id, else generation_config.json's (where recent checkpoints keep eos); a list's first."""
    value = raw.get(key)
    value = generation.get(key) if value is None else value
    return value[0] if isinstance(value, list) and value else value


def _text_config(raw: dict, generation: dict, tokenizer: Tokenizer, directory: Path) -> TextConfig:
    ids = {t: tokenizer.token_to_id(t) for t in NEW_SPECIALS}
    text_vocab = max(int(raw["vocab_size"]), tokenizer.get_vocab_size(with_added_tokens=True))
    eos = _special_id(raw, generation, "eos_token_id")
    if eos is None:
        raise UserError(f"{directory}: neither config.json nor generation_config.json gives eos_token_id; set it "
                        "to the id of the tokenizer's end-of-text token")
    bos, pad = _special_id(raw, generation, "bos_token_id"), _special_id(raw, generation, "pad_token_id")
    # Without a BOS id a prompt starts with the end-of-text token (Qwen2 and Qwen3 configs name it for both).
    return TextConfig(text_vocab_size=text_vocab, pad_id=eos if pad is None else pad,
                      bos_id=eos if bos is None else bos, eos_id=eos, sep_id=ids["<sep>"],
                      img_start_id=ids["<img_start>"], img_end_id=ids["<img_end>"])


@dataclasses.dataclass
class DecoderCheckpoint:
    """A Hugging Face decoder directory, read and checked: the config, the text config of the
    extended vocabulary, its tokenizer.json (specials added) and its tensors (our names)."""

    config: DecoderConfig
    text: TextConfig
    tokenizer_json: str
    state: dict[str, torch.Tensor]
    source: str


def read_decoder_checkpoint(directory: str | Path) -> DecoderCheckpoint:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass a local Hugging Face checkpoint directory")
    if not (directory / "tokenizer.json").is_file():
        raise UserError(f"{directory} has no tokenizer.json (the fast-tokenizer file); save it with "
                        "tokenizer.save_pretrained() first")
    raw = json.loads((directory / "config.json").read_text())
    dcfg = decoder_config_from_hf(raw)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in NEW_SPECIALS])
    state = hf_to_decoder_state(read_hf_weights(directory))
    embed = state.get("embed_tokens.weight")
    if embed is not None and embed.shape[0] != raw["vocab_size"]:
        raise UserError(f"{directory}: embed_tokens has {embed.shape[0]} rows but config.json's vocab_size is "
                        f"{raw['vocab_size']}; the weights and config.json are from different models")
    generation_file = directory / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    return DecoderCheckpoint(dcfg, _text_config(raw, generation, tokenizer, directory), tokenizer.to_str(), state,
                             str(directory))


def load_decoder_checkpoint(decoder: LlamaDecoder, checkpoint: DecoderCheckpoint, seed: int = 0) -> None:
    """Load the checkpoint into a decoder over the joint vocabulary: the new rows (specials, image
    codes) start near the mean embedding."""
    state = dict(checkpoint.state)
    gen = torch.Generator().manual_seed(seed)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in state and (name == "embed_tokens.weight" or not checkpoint.config.tie_word_embeddings):
            state[name] = _extend_rows(state[name], decoder.vocab_size - state[name].shape[0], gen)
    load_hf_decoder_state(decoder, state, checkpoint.source)


# -- the other way: the decoder as a Hugging Face checkpoint ---------------------------------------
def hf_model_type(cfg: DecoderConfig) -> str:
    """The transformers architecture that computes exactly this decoder."""
    if cfg.qk_norm and cfg.attention_bias == cfg.attention_out_bias and not cfg.mlp_bias:
        return "qwen3"
    if not cfg.qk_norm and cfg.attention_bias and not cfg.attention_out_bias and not cfg.mlp_bias:
        return "qwen2"
    if not cfg.qk_norm and cfg.attention_bias == cfg.attention_out_bias:
        return "llama"
    raise UserError("this decoder's mix of biases and q/k norms has no transformers architecture "
                    "(an o_proj bias without q/k/v biases); it cannot be written as a Hugging Face checkpoint")


ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(cfg: DecoderConfig, text: TextConfig, vocab_size: int) -> dict:
    """config.json for the decoder over the joint vocabulary (text tokens, then image codes)."""
    model_type = hf_model_type(cfg)
    raw = {"architectures": [ARCHITECTURE_CLASSES[model_type]], "model_type": model_type,
           "vocab_size": vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
           "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": text.bos_id, "eos_token_id": text.eos_id,
           "pad_token_id": text.pad_id, "torch_dtype": "float32"}
    if model_type == "llama":
        raw |= {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    if model_type == "qwen3":
        raw["attention_bias"] = cfg.attention_bias
    if model_type in ("qwen2", "qwen3"):
        raw["use_sliding_window"] = False
    return raw


def decoder_to_hf_state(decoder: LlamaDecoder) -> dict[str, torch.Tensor]:
    """Our names -> transformers' (`model.` prefix; lm_head kept unless tied)."""
    tied = decoder.cfg.tie_word_embeddings
    return {name if name == "lm_head.weight" else f"model.{name}": tensor.contiguous()
            for name, tensor in decoder.state_dict().items() if not (tied and name == "lm_head.weight")}
