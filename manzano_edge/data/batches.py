"""Training examples and batches for every stage.

Sequence layouts over the joint vocabulary (one place, shared by training and the runtime):
- understanding: <bos> <img_start> [N image embeddings] <img_end> question <sep> answer <eos>
  (one row per question; a scene carries several, so one image pass feeds several rows)
- generation:    <bos> prompt <img_start> [N image-code tokens] <img_end>
- text:          <bos> text <eos>
Loss weights follow the paper: text 1.0, image tokens 0.5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from manzano_edge.config import ModelConfig
from manzano_edge.data import scenes
from manzano_edge.data.images import load_image, to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError

IGNORE = -100
IMAGE_LOSS_WEIGHT = 0.5
UNDERSTANDING_IMAGE_SLOT = 2  # image embeddings start after <bos> <img_start>


@dataclass
class Example:
    pixels: torch.Tensor  # [3, H, W]
    qa: list[tuple[str, str]]  # (question, answer) pairs about this image; a caption is one of them
    prompt: str  # text-to-image prompt for this image
    # The image whose codes `prompt` should generate, when not `pixels`: a loose scene's canonical
    # twin, so loose layouts teach understanding without blurring what generation draws.
    generation_pixels: torch.Tensor | None = None

    @property
    def generation_target(self) -> torch.Tensor:
        return self.pixels if self.generation_pixels is None else self.generation_pixels

    @property
    def question(self) -> str:
        return self.qa[0][0]

    @property
    def answer(self) -> str:
        return self.qa[0][1]


def check_question_weights(weights: dict[str, float] | None) -> dict[str, float] | None:
    """A misspelt kind would silently keep the uniform draw: refuse it, and non-positive weights."""
    for kind, weight in (weights or {}).items():
        if kind not in scenes.QUESTION_KINDS:
            raise UserError(f"unknown question kind {kind!r} in question_weights; choose from "
                            f"{', '.join(scenes.QUESTION_KINDS)}")
        if not weight > 0:
            raise UserError(f"question_weights[{kind!r}] must be positive, got {weight}")
    return weights


class SceneSource:
    """Endless procedural examples; a given seed always yields the same stream."""

    def __init__(self, image_size: int, seed: int, questions_per_image: int = 3,
                 hard_negative_rate: float = 0.0, two_object_share: float | None = None,
                 loose_share: float = 0.0, question_weights: dict[str, float] | None = None) -> None:
        self.image_size = image_size
        self.hard_negative_rate = hard_negative_rate
        self.question_weights = check_question_weights(question_weights)  # None keeps the stream
        self.two_object_share = two_object_share
        self.loose_share = loose_share  # chance of a loose layout (scenes.LOOSE_*); 0 keeps the stream
        self.rng = np.random.default_rng(seed)
        # Several questions per scene: the image encoder dominates a step's cost, and one pass
        # then supervises several answers (VQA stalled at ~57% with one question per image).
        self.questions_per_image = questions_per_image

    def sample(self, caption_prob: float = 0.4) -> Example:
        loose = self.loose_share > 0 and self.rng.random() < self.loose_share
        scene = scenes.sample_scene(self.rng, two_object_share=self.two_object_share, loose=loose)
        pixels = to_pixels(scenes.render(scene, self.image_size), self.image_size)[0]
        qa = []
        for _ in range(self.questions_per_image):
            if self.rng.random() < caption_prob:
                qa.append((scenes.caption_question(self.rng), scenes.caption(scene)))
            else:
                qa.append(scenes.question_answer(scene, self.rng, self.hard_negative_rate, self.question_weights))
        twin = None
        if loose:
            twin = to_pixels(scenes.render(scenes.canonical_twin(scene, self.rng), self.image_size), self.image_size)[0]
        return Example(pixels, qa, scenes.generation_prompt(scene, self.rng), twin)


class FolderSource:
    """A user's images plus a JSONL of captions: one object per line,
    {"image": "relative/or/absolute.png", "caption": "...", "question": "...", "answer": "..."};
    question/answer are optional (default: a caption question answered by the caption)."""

    def __init__(self, image_dir: str | Path, jsonl: str | Path, image_size: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        image_dir, jsonl = Path(image_dir), Path(jsonl)
        if not jsonl.is_file():
            raise UserError(f"captions file not found: {jsonl}")
        self.items: list[tuple[torch.Tensor, dict]] = []
        for lineno, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                path = rec["image"]
                rec["caption"] = str(rec["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{jsonl}:{lineno}: expected a JSON object with 'image' and 'caption'") from exc
            img_path = Path(path) if Path(path).is_absolute() else image_dir / path
            self.items.append((to_pixels(load_image(img_path), image_size)[0], rec))
        if not self.items:
            raise UserError(f"{jsonl} lists no images; add lines like {{\"image\": \"a.png\", \"caption\": \"...\"}}")

    def sample(self, caption_prob: float = 0.4) -> Example:
        pixels, rec = self.items[self.rng.integers(len(self.items))]
        if "question" in rec and "answer" in rec and self.rng.random() >= caption_prob:
            q, a = str(rec["question"]), str(rec["answer"])
        else:
            q, a = scenes.caption_question(self.rng), str(rec["caption"])
        return Example(pixels, [(q, a)], str(rec["caption"]))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def understanding_batch(examples: list[Example], codec: TextCodec, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One row per (question, answer) pair, with placeholder ids at the N image slots (filled
    with embeddings by the model); `image_index[row]` is the row's image in `pixels`."""
    t, n = cfg.text, cfg.vision.num_image_tokens
    tokens, targets, image_index = [], [], []
    for i, ex in enumerate(examples):
        for question, answer_text in ex.qa:
            prefix = [t.bos_id, t.img_start_id] + [t.pad_id] * n + [t.img_end_id] + codec.encode(question) + [t.sep_id]
            answer = codec.encode(answer_text) + [t.eos_id]
            seq = prefix + answer
            tokens.append(seq[:-1])
            targets.append([IGNORE] * (len(prefix) - 1) + answer)
            image_index.append(i)
    toks, tgts = _pad(tokens, t.pad_id), _pad(targets, IGNORE)
    return {"pixels": torch.stack([ex.pixels for ex in examples]), "tokens": toks, "targets": tgts,
            "weights": (tgts != IGNORE).float(), "image_index": torch.tensor(image_index, dtype=torch.long)}


def generation_batch(prompts: list[str], image_ids: torch.Tensor, codec: TextCodec, cfg: ModelConfig,
                     rng: np.random.Generator, prompt_dropout: float = 0.1) -> dict[str, torch.Tensor]:
    """Text -> image tokens. A dropped prompt trains the unconditional branch used by CFG."""
    t = cfg.text
    tokens, targets, weights = [], [], []
    for prompt, ids in zip(prompts, image_ids.tolist()):
        text = [] if rng.random() < prompt_dropout else codec.encode(prompt)
        prefix = [t.bos_id] + text + [t.img_start_id]
        image = [i + cfg.image_token_offset for i in ids] + [t.img_end_id]
        seq = prefix + image
        tokens.append(seq[:-1])
        targets.append([IGNORE] * (len(prefix) - 1) + image)
        weights.append([0.0] * (len(prefix) - 1) + [IMAGE_LOSS_WEIGHT] * len(ids) + [1.0])
    return {"tokens": _pad(tokens, t.pad_id), "targets": _pad(targets, IGNORE),
            "weights": torch.tensor([w + [0.0] * (max(map(len, weights)) - len(w)) for w in weights])}


def text_batch(texts: list[str], codec: TextCodec, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = cfg.text
    rows = [[t.bos_id] + codec.encode(x) + [t.eos_id] for x in texts]
    tgts = _pad([r[1:] for r in rows], IGNORE)
    return {"tokens": _pad([r[:-1] for r in rows], t.pad_id), "targets": tgts, "weights": (tgts != IGNORE).float()}


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy, averaged per example, then over the batch: a 1-token VQA answer
    counts as much as a 20-token caption (averaging over tokens let captions drown VQA)."""
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    per_token = per_token.view(targets.shape)
    per_example = (per_token * weights).sum(1) / weights.sum(1).clamp_min(1e-6)
    has_targets = weights.sum(1) > 0
    return per_example[has_targets].mean() if has_targets.any() else per_token.sum() * 0.0


def splice_image_embeddings(token_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    n = image_embeds.shape[1]
    s = UNDERSTANDING_IMAGE_SLOT
    return torch.cat([token_embeds[:, :s], image_embeds.to(token_embeds.dtype), token_embeds[:, s + n:]], dim=1)
