"""The app contract: everything an app needs besides the graphs to run caption and text-to-image,
serialised from the same definitions the Python runtime decodes with (`spec/decoding.py`).

`pipeline_contract` becomes the manifest's `pipeline` section (schema in docs/guides/deploying.md,
"The pipeline contract"); `generation_config` and `preprocessor_config` are its Hugging Face-style
projections for the tools that read those files. The masks are read back from the tensors the
runtime adds to the logits, so the contract cannot drift from the code.
"""

from __future__ import annotations

import torch

from manzano_edge.config import DEFAULT_FLOW_STEPS, DEFAULT_MAX_NEW_TOKENS, ModelConfig
from manzano_edge.spec.decoding import (
    GENERATION_FIXED_TOKENS,
    UNDERSTANDING_FIXED_TOKENS,
    codes_only_mask,
    generation_layout,
    guidance_rows,
    text_only_mask,
    understanding_layout,
)

SCHEMA = "manzano-edge/pipeline@1"
GENERATION_CONFIG_FILE = "generation_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# Placeholders in the prompt templates, replaced by the app.
QUESTION, PROMPT, IMAGE = "{question}", "{prompt}", "{image}"


def allowed_ranges(mask: torch.Tensor) -> list[list[int]]:
    """Additive [V] mask -> the half-open id ranges [lo, hi) where it is 0 (the ids that may be picked)."""
    allowed = (mask == 0).tolist()
    ranges, start = [], None
    for i, ok in enumerate([*allowed, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            ranges.append([start, i])
            start = None
    return ranges


def _template(ids: list[int], slots: dict[int, str]) -> list[int | str]:
    return [slots.get(i, i) for i in ids]


def special_tokens(cfg: ModelConfig) -> dict[str, int]:
    t = cfg.text
    return {"pad": t.pad_id, "bos": t.bos_id, "eos": t.eos_id, "sep": t.sep_id, "img_start": t.img_start_id,
            "img_end": t.img_end_id}


def pipeline_contract(cfg: ModelConfig, tokenizer_file: str, null_condition_file: str) -> dict:
    """The manifest's `pipeline` section: prompts, masks, sampling, guidance, the flow loop, latents, pixels."""
    t, v = cfg.text, cfg.vision
    n, offset, hw = v.num_image_tokens, cfg.image_token_offset, v.image_size
    marker = -1  # a stand-in id for the slot, swapped for its placeholder name below
    before, after = understanding_layout(t, [marker])
    c, h = cfg.vae.latent_channels, cfg.latent_size
    return {
        "schema": SCHEMA,
        "tokenizer": {
            "file": tokenizer_file, "format": "huggingface-tokenizers",
            "add_special_tokens": False,
            "note": "encode the user's text alone (no special tokens); the templates below add them",
            "runner_text": "the stock runners' tokenizer files (manifest runners.*) apply no normalizer and no prefix "
                           "space: hand them lowercase(NFKC(text)) with one space in front unless it starts with one",
        },
        "vocabulary": {
            "size": cfg.vocab_size, "text_tokens": [0, t.text_vocab_size],
            "image_token_offset": offset, "image_codes": v.codebook_size,
            "special_tokens": special_tokens(cfg),
            "code_of_token": "token_id - image_token_offset", "token_of_code": "code + image_token_offset",
        },
        "decoder": {
            "max_len": cfg.decoder.max_position_embeddings,
            "step": "logits = decoder(inputs_embeds [B,T,D], causal_mask [B,1,T,E]); E = past + T; the cache keeps "
                    "the first E positions; the logits are the last position's",
            "causal_mask": "additive float32: 0 where key k <= past + q, -inf elsewhere; a left-padded row also "
                           "hides keys k < pad (except a padding query's own key)",
            "embeddings": "inputs_embeds = embed_tokens(ids); image embeddings are spliced in as rows",
            "reset": "zero the cache (a new prompt starts at past = 0)",
        },
        "understanding": {
            "template": [*_template(before, {}), IMAGE, *_template(after, {marker: QUESTION})],
            "image_tokens": n, "image_slot": len(before),
            "fixed_tokens": UNDERSTANDING_FIXED_TOKENS,
            "image_embeddings": "tokenizer(pixels).image_embeds [1, N, D], spliced at image_slot",
            "allowed_ids": allowed_ranges(text_only_mask(cfg)),
            "stop_ids": [t.eos_id],
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
            "output": "tokenizer.decode(ids of text tokens, skip_special_tokens=True).strip()",
        },
        "text_to_image": {
            "template": _template(generation_layout(t, [marker]), {marker: PROMPT}),
            "fixed_tokens": GENERATION_FIXED_TOKENS,
            "image_tokens": n,
            "allowed_ids": allowed_ranges(codes_only_mask(cfg)),
            "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
            "token_guidance": {
                "default_scale": 1.0, "off_at": 1.0, "decoder_graph": "decoder_cfg",
                "rows": [_template(r, {marker: PROMPT}) for r in guidance_rows(generation_layout(t, [marker]),
                                                                               t.bos_id, t.img_start_id)],
                "padding": f"left-pad the shorter row with id {t.pad_id} and mask the padded keys per row; "
                           "both rows take the picked token",
                "formula": "logits = uncond + scale * (cond - uncond)  (row 0 cond, row 1 uncond)",
            },
            "codes": "code = token - image_token_offset, for N picked tokens; no <img_end> step is run",
            "condition": "code_features(image_ids = codes [1, N] int32) -> condition [1, N, D]",
            "flow": {
                "steps": DEFAULT_FLOW_STEPS,
                "noise": f"x ~ N(0, 1), shape [1, {c}, {h}, {h}], float32",
                "timesteps": "t_i = i / steps, i = 0 .. steps - 1",
                "step": "x = x + velocity / steps  (Euler)",
                "velocity": "dit(latent = x, timestep = [t_i], condition) -> velocity",
                "guidance": {
                    "default_scale": 1.0, "off_at": 1.0,
                    "batch": "latent [x, x], timestep [t_i, t_i], condition [cond, null_condition]",
                    "formula": "velocity = v_uncond + scale * (v_cond - v_uncond)  (row 0 cond, row 1 uncond)",
                    "null_condition": {"file": null_condition_file, "tensor": "null_condition",
                                       "shape": [1, 1, cfg.decoder.hidden_size],
                                       "use": "broadcast to [1, N, D]"},
                },
            },
            "latent": {"channels": c, "size": h, "scaling_factor": cfg.vae.scaling_factor,
                       "decode": "pixels = vae_decoder(latent = x / scaling_factor)"},
        },
        "pixels": pixel_contract(hw),
    }


def pixel_contract(size: int) -> dict:
    return {
        "input": {"layout": "NCHW", "shape": [1, 3, size, size], "dtype": "float32", "channels": "RGB",
                  "alpha": "composite on white, then drop", "resize": "to size x size (aspect not kept), Lanczos",
                  "range": [-1.0, 1.0], "from_uint8": "x / 127.5 - 1"},
        "output": {"layout": "NCHW", "shape": [1, 3, size, size], "dtype": "float32", "channels": "RGB",
                   "clamp": [-1.0, 1.0], "to_uint8": "round((x + 1) * 127.5)"},
    }


def generation_config(cfg: ModelConfig) -> dict:
    """Hugging Face `generation_config.json` for understanding (greedy text); text-to-image's extra
    rules (codes-only ids, guidance) are in the manifest's pipeline contract."""
    t = cfg.text
    return {"bos_token_id": t.bos_id, "eos_token_id": t.eos_id, "pad_token_id": t.pad_id, "do_sample": False,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "max_length": cfg.decoder.max_position_embeddings}


def preprocessor_config(cfg: ModelConfig) -> dict:
    """Hugging Face `preprocessor_config.json` (CLIPImageProcessor's fields): x / 255, then (x - 0.5) / 0.5
    is the runtime's x / 127.5 - 1."""
    size = cfg.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 1, "do_center_crop": False,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
