"""The onnxruntime-genai folder the ONNX exporter writes: its `genai_config.json`, a tokenizer it reads
as `tokenizers` does, and the manifest's record of how an app drives it.

Model type `phi3v`: of onnxruntime-genai's vision -> embedding -> decoder types it is the one whose
image-token count per image is the caller's (`num_image_tokens`; gemma3 fixes 256), whose 2-D
`image_features` let a prompt carry no image at all (text-to-image), and whose embedding graph
takes negative ids as image slots. Its image processor is Phi-3's HD crop, which this model does
not use: the app prepares `pixel_values` by the pipeline contract and passes them with
`Generator.set_inputs` (docs/guides/deploying.md, "onnxruntime-genai").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from manzano_edge.config import ModelConfig
from manzano_edge.data.text import runner_tokenizer
from manzano_edge.fsutil import path_digest
from manzano_edge.spec.graphs import Convention, graph_specs

if TYPE_CHECKING:
    from manzano_edge.export.base import Entry

FOLDER = "onnx-genai"
RUNNER = "onnxruntime-genai"
MODEL_TYPE = "phi3v"
CONFIG_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
IMAGE_SLOT_ID = -1
# What an app does to text before a stock runner's tokenizer (`data.text.runner_text`).
RUNNER_TEXT = ("tokenize lowercase(NFKC(text)), with one space put in front unless it starts with one, with the "
               "folder's tokenizer")  # phi3v marks the k-th image's slots with -k
# The graphs onnxruntime-genai loads, by the section of genai_config.json that names them.
SECTIONS = {"vision": "tokenizer", "embedding": "embed_tokens", "decoder": "decoder"}


def tokenizer_config(cfg: ModelConfig, tokenizer_json: str) -> dict:
    """GPT2Tokenizer is the class onnxruntime-genai's loader reads a byte-level BPE as; the templates
    add the special tokens, so the tokenizer adds none."""
    names = {t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": names[cfg.text.bos_id], "eos_token": names[cfg.text.eos_id],
            "pad_token": names[cfg.text.pad_id], "add_bos_token": False, "add_eos_token": False,
            "model_max_length": cfg.decoder.max_position_embeddings - 1}


def genai_config(cfg: ModelConfig) -> dict:
    d, t = cfg.decoder, cfg.text
    specs = graph_specs(cfg)
    files = {section: specs[graph].variants[Convention.STOCK_VLM].file + ".onnx" for section, graph in SECTIONS.items()}
    context = d.max_position_embeddings - 1  # the graphs' cache positions (DESIGN: a prompt plus its answer fit in max_len - 1)
    return {"model": {
        "type": MODEL_TYPE, "vocab_size": cfg.vocab_size, "context_length": context,
        "bos_token_id": t.bos_id, "eos_token_id": [t.eos_id], "pad_token_id": t.pad_id,
        "vision": {"filename": files["vision"], "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_features"}},
        "embedding": {"filename": files["embedding"], "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "decoder": {"filename": files["decoder"], "hidden_size": d.hidden_size, "num_attention_heads": d.num_attention_heads,
                    "num_key_value_heads": d.num_key_value_heads, "num_hidden_layers": d.num_hidden_layers,
                    "head_size": d.head_dim,
                    "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": context, "num_beams": 1}}


def write_folder(out: Path, cfg: ModelConfig, tokenizer_json: str, entries: list[Entry]) -> dict:
    """Write the runner's files next to the variant graphs and return the manifest's record of the folder."""
    folder = out / FOLDER
    written = {e.graph for e in entries if e.fmt == FOLDER}
    missing = [g for g in SECTIONS.values() if g not in written]
    if missing:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return {"folder": None, "not_written": f"it needs the graphs {', '.join(missing)}: add them to --graphs"}
    files = {CONFIG_FILE: json.dumps(genai_config(cfg), indent=2) + "\n",
             TOKENIZER_FILE: json.dumps(runner_tokenizer(tokenizer_json), ensure_ascii=False),
             TOKENIZER_CONFIG_FILE: json.dumps(tokenizer_config(cfg, tokenizer_json), indent=2) + "\n"}
    records = []
    for name, text in files.items():
        (folder / name).write_text(text)
        digest, size = path_digest(folder / name)
        records.append({"file": f"{FOLDER}/{name}", "sha256": digest, "bytes": size})
    n = cfg.vision.num_image_tokens
    return {
        "folder": FOLDER, "model_type": MODEL_TYPE, "files": records,
        "graphs": dict(SECTIONS),
        "text": RUNNER_TEXT,
        "understanding": {
            "input_ids": f"the understanding template with {n} ids {IMAGE_SLOT_ID} at the image slot, int32",
            "pixel_values": "pixels.input of the pipeline contract [1, 3, H, W] float32",
            "num_image_tokens": [n],
            "call": "Generator.set_inputs({input_ids, pixel_values, num_image_tokens})",
            "logits": "before each generate_next_token: set_logits(get_logits() + the understanding mask)",
        },
        "text_to_image": {
            "input_ids": "the text-to-image template, int32 (no image)",
            "call": "Generator.set_inputs({input_ids})",
            "logits": "before each of the N generate_next_token calls: set_logits(get_logits() + the codes-only mask)",
            "guidance": "not expressible: onnxruntime-genai decodes one row; image-token guidance needs the "
                        "two-row decoder_cfg graph (the ONNX folder) and the app's own loop",
        },
    }
