"""Use a local Hugging Face Llama-family checkpoint (config.json + *.safetensors +
tokenizer.json) as the unified decoder's backbone.

Parameter names map 1:1 (`model.` prefix dropped). The vocabulary is extended, as in the
paper, with <sep>, <img_start>, <img_end> (added to tokenizer.json) and one row per image
code; new rows start at the mean of the existing embeddings plus small noise. Nothing is
downloaded: the directory must already be on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from manzano_edge.config import DecoderConfig, ModelConfig, TextConfig, preset
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano, load_state

NEW_SPECIALS = ("<sep>", "<img_start>", "<img_end>")


def decoder_config_from_hf(raw: dict) -> DecoderConfig:
    if raw.get("model_type") not in (None, "llama", "mistral", "qwen2") and "Llama" not in str(raw.get("architectures")):
        raise UserError(f"config.json describes a '{raw.get('model_type')}' model; only Llama-architecture checkpoints "
                        "map onto the decoder")
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older files use rope_theta/rope_scaling.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise UserError("this checkpoint uses rope_scaling, which the decoder does not implement; "
                        "use a Llama checkpoint with plain RoPE")
    try:
        return DecoderConfig(
            hidden_size=raw["hidden_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            intermediate_size=raw["intermediate_size"], max_position_embeddings=raw["max_position_embeddings"],
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc}; is this a Hugging Face Llama checkpoint?") from exc


def hf_to_decoder_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`; lm_head kept."""
    out = {}
    for name, tensor in hf_state.items():
        if name.startswith("model."):
            out[name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            out[name] = tensor
    return out


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors in {directory}; convert the checkpoint to safetensors (pickle is not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state(f))
    return state


def _extend_rows(weight: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    mean, std = weight.float().mean(0), weight.float().std(0).mean()
    new = mean + torch.randn(rows, weight.shape[1], generator=generator) * std * 0.1
    return torch.cat([weight.float(), new])


def import_llama(directory: str | Path, base_preset: str = "tiny", seed: int = 0) -> tuple[Manzano, str]:
    """Build a Manzano whose decoder is the given Llama (vocab extended); vision/diffusion parts
    come from `base_preset`, freshly initialised (train them with `manzano-edge train`)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass a local Hugging Face Llama checkpoint directory")
    if not (directory / "tokenizer.json").is_file():
        raise UserError(f"{directory} has no tokenizer.json (the fast-tokenizer file); save it with "
                        "tokenizer.save_pretrained() first")
    raw = json.loads((directory / "config.json").read_text())
    dcfg = decoder_config_from_hf(raw)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in NEW_SPECIALS])
    ids = {t: tokenizer.token_to_id(t) for t in NEW_SPECIALS}
    base_vocab = int(raw["vocab_size"])
    text_vocab = max(base_vocab, tokenizer.get_vocab_size(with_added_tokens=True))
    eos = raw.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    text = TextConfig(text_vocab_size=text_vocab, pad_id=raw.get("pad_token_id") or eos, bos_id=raw.get("bos_token_id", 1),
                      eos_id=eos, sep_id=ids["<sep>"], img_start_id=ids["<img_start>"], img_end_id=ids["<img_end>"])
    base = preset(base_preset)
    cfg = ModelConfig(name=f"{base_preset}+{directory.name}", vision=base.vision, decoder=dcfg, dit=base.dit,
                      vae=base.vae, text=text).validate()
    torch.manual_seed(seed)
    model = Manzano(cfg)
    state = hf_to_decoder_state(read_hf_weights(directory))
    gen = torch.Generator().manual_seed(seed)
    extra = cfg.vocab_size - base_vocab
    state["embed_tokens.weight"] = _extend_rows(state["embed_tokens.weight"], extra, gen)
    if dcfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = _extend_rows(state["lm_head.weight"], extra, gen)
    expected = model.decoder.state_dict()
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if dcfg.tie_word_embeddings else set()))
    if missing:
        raise UserError(f"{directory} lacks decoder weights {missing[:3]}; is it a complete Llama checkpoint?")
    model.decoder.load_state_dict({k: v.float() for k, v in state.items() if k in expected}, strict=False)
    return model.eval(), tokenizer.to_str()
