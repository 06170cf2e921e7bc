"""Text tokenizer: a byte-level BPE trained with Hugging Face `tokenizers` on the scene
domain's wording and saved as `tokenizer.json`. Byte-level means any text a user types
encodes (unknown words split into bytes) instead of failing or mapping to <unk>.

The special tokens take ids 0..5 so they line up with `TextConfig`.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from manzano_edge.config import TextConfig
from manzano_edge.data import scenes
from manzano_edge.errors import UserError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<sep>", "<img_start>", "<img_end>"]


def domain_corpus(n_scenes: int = 4000, seed: int = 0) -> Iterable[str]:
    rng = np.random.default_rng(seed)
    for _ in range(n_scenes):
        scene = scenes.sample_scene(rng)
        yield scenes.caption(scene)
        yield scenes.generation_prompt(scene, rng)
        yield scenes.caption_question(rng)
        yield " ".join(scenes.question_answer(scene, rng))


def train_bpe(vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def runner_text(text: str) -> str:
    """What an app hands a stock runner's tokenizer (onnxruntime-genai, ExecuTorch's LLM runners),
    which apply neither the normalizer nor the prefix space: with the `runner_tokenizer` file it
    then gets `TextCodec.encode`'s ids."""
    text = unicodedata.normalize("NFKC", text).lower()
    return text if text.startswith(" ") else " " + text  # ByteLevel's add_prefix_space adds none before a space


def runner_tokenizer(tokenizer_json: str) -> dict:
    """The same BPE without the steps the stock runners' tokenizers skip or reject (`runner_text`
    does them in the app), so every runtime reads the file as `tokenizers` does."""
    tok = json.loads(tokenizer_json)
    tok["normalizer"] = None
    for part in ("pre_tokenizer", "decoder", "post_processor"):
        if isinstance(tok.get(part), dict) and "add_prefix_space" in tok[part]:
            tok[part]["add_prefix_space"] = False
    return tok


def with_joint_vocabulary(tok: dict, vocab_size: int, image_offset: int) -> dict:
    """A tokenizer.json (as a dict) with one special token per id of the joint vocabulary, for
    runtimes that pick among the tokenizer's ids only: `<unused_N>` for a text id the BPE never uses,
    `<img_N>` for image code N."""
    used = {*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])}
    for i in range(vocab_size):
        if i not in used:
            name = f"<img_{i - image_offset}>" if i >= image_offset else f"<unused_{i}>"
            tok["added_tokens"].append({"id": i, "content": name, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True})
    return tok


class TextCodec:
    """Encode/decode text within the joint vocabulary (text ids only)."""

    def __init__(self, tokenizer_json: str, text: TextConfig) -> None:
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.cfg = text
        for name, expected in (("<sep>", text.sep_id), ("<img_start>", text.img_start_id),
                               ("<img_end>", text.img_end_id)):
            if self.tok.token_to_id(name) != expected:
                raise UserError(f"tokenizer.json does not define {name} at id {expected} as the config expects; "
                                "the checkpoint's files do not belong together")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i < self.cfg.text_vocab_size]
        return self.tok.decode(ids, skip_special_tokens=True).strip()
