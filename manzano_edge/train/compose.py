"""Compose a MANZANO from parts: a Hugging Face decoder (Llama, Mistral, Qwen2, Qwen3) and/or a
SigLIP or CLIP vision tower, the rest (adapters, DiT, VAE; and the decoder or ViT where none is
given) from a preset, freshly initialised. `manzano-edge import` and the Python API both call
`import_model`; train what is new with `manzano-edge train --init CKPT` (or `train(..., init=)`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from manzano_edge.config import ModelConfig, preset
from manzano_edge.data.text import domain_corpus, train_bpe
from manzano_edge.errors import UserError
from manzano_edge.models.hf_decoder import load_decoder_checkpoint, read_decoder_checkpoint
from manzano_edge.models.hf_vision import load_vision_tower, read_vision_tower
from manzano_edge.models.manzano import Manzano


@dataclasses.dataclass
class ImportedModel:
    model: Manzano
    tokenizer_json: str
    # Checkpoint tensors deliberately not used (a vision tower's pooled-output head), by name.
    left_out: list[str]


def import_model(decoder: str | Path | None = None, vision: str | Path | None = None, base_preset: str = "tiny",
                 image_size: int | None = None, seed: int = 0) -> ImportedModel:
    """A Manzano whose decoder and/or ViT are the given local Hugging Face checkpoints; every other
    part from `base_preset`, freshly initialised with `seed`."""
    if decoder is None and vision is None:
        raise UserError("nothing to import: pass a decoder directory, a vision tower directory, or both")
    if image_size is not None and vision is None:
        raise UserError("--image-size sets the imported vision tower's input size; pass --vision too")
    base = preset(base_preset)
    text, dcfg, tokenizer_json, checkpoint = base.text, base.decoder, None, None
    if decoder is not None:
        checkpoint = read_decoder_checkpoint(decoder)
        text, dcfg, tokenizer_json = checkpoint.text, checkpoint.config, checkpoint.tokenizer_json
    tower = None if vision is None else read_vision_tower(vision, image_size, base.vision.fsq_levels,
                                                          pixel_multiple=base.vae.downsample * base.dit.patch_size)
    parts = [Path(p).name for p in (decoder, vision) if p is not None]
    cfg = ModelConfig(name=f"{base_preset}+{'+'.join(parts)}", vision=tower.config if tower else base.vision,
                      decoder=dcfg, dit=base.dit, vae=base.vae, text=text).validate()
    torch.manual_seed(seed)
    model = Manzano(cfg)
    if checkpoint is not None:
        load_decoder_checkpoint(model.decoder, checkpoint, seed)
    else:  # the preset's decoder is trained from scratch, so it gets the BPE `train` would build
        tokenizer_json = train_bpe(text.text_vocab_size, domain_corpus(seed=seed)).to_str()
    if tower is not None:
        load_vision_tower(model.tokenizer.encoder, tower)
    return ImportedModel(model.eval(), tokenizer_json, tower.left_out if tower else [])
