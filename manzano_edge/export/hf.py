"""The decoder as a Hugging Face checkpoint (`manzano-edge export-hf`): config.json (Llama, Qwen2 or
Qwen3, whichever computes it exactly), model.safetensors in transformers' names, generation_config.json,
and tokenizer.json over the joint vocabulary (each image code a special token `<img_N>` at its id). It
loads in transformers and in the tools that read that layout (llama.cpp's `convert_hf_to_gguf.py`,
onnxruntime-genai's model builder), so the same weights can be compared across runtimes."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from manzano_edge.data.text import with_joint_vocabulary
from manzano_edge.fsutil import atomic_output_dir
from manzano_edge.models.hf_decoder import decoder_to_hf_state, hf_config
from manzano_edge.models.manzano import Manzano


def write_hf_checkpoint(model: Manzano, tokenizer_json: str, out: Path, overwrite: bool = False) -> Path:
    """Write the decoder of `model` to `out` (never half-written)."""
    cfg = model.cfg
    config = hf_config(cfg.decoder, cfg.text, cfg.vocab_size)
    generation = {"bos_token_id": cfg.text.bos_id, "eos_token_id": cfg.text.eos_id, "pad_token_id": cfg.text.pad_id}
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(decoder_to_hf_state(model.decoder), tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer = with_joint_vocabulary(json.loads(tokenizer_json), cfg.vocab_size, cfg.image_token_offset)
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return Path(out)
