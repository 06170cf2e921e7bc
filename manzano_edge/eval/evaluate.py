"""`manzano-edge eval`: understanding (caption + VQA) and generation (ShapesEval) scores on
held-out scenes, plus ShapesEval of images reconstructed through the discrete tokens.

Held-out scenes come from a seed stream that training never draws from (training seeds
are plain integers; evaluation uses the SeedSequence [seed, HELD_OUT_TAG]).
"""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from manzano_edge.data import scenes
from manzano_edge.data.images import to_image, to_pixels
from manzano_edge.eval.shapes_eval import ShapesScore, detect
from manzano_edge.metrics import image_psnr
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig

HELD_OUT_TAG = 424242
EVAL_SCHEMA = "manzano-edge/eval@1"  # documented in docs/guides/training-and-evaluation.md


@dataclass
class EvalConfig:
    vqa: int = 400
    captions: int = 200
    generation: int = 150
    reconstruction: int = 150
    drawings: int = 100
    seed: int = 0
    # Greedy, as `manzano-edge eval` and `generate` default to: sampling at the pipeline's temperature 1
    # scores text-to-image far lower. Pass SamplingConfig() to score sampled generation.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))


def held_out_rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng([seed, HELD_OUT_TAG, sum(map(ord, part))])


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def eval_understanding(pipe: Pipeline, n_vqa: int, n_captions: int, seed: int, show: bool = True) -> dict:
    size = pipe.cfg.vision.image_size
    rng = held_out_rng(seed, "vqa")
    vqa_ok, kinds = 0, {}
    for _ in tqdm(range(n_vqa), desc="eval vqa", unit="question", disable=not show):
        scene = scenes.sample_scene(rng)
        question, answer = scenes.question_answer(scene, rng)
        got = pipe.understand(to_pixels(scenes.render(scene, size), size), question)
        ok = normalize_answer(got) == normalize_answer(answer)
        vqa_ok += ok
        kind = answer if answer in ("yes", "no") else "count" if answer in scenes.COUNT_WORDS.values() else \
            "color" if answer in scenes.COLORS else "shape" if answer in scenes.SHAPES else "position"
        hit, total = kinds.get(kind, (0, 0))
        kinds[kind] = (hit + ok, total + 1)
    rng = held_out_rng(seed, "caption")
    cap_ok, examples = 0, []
    for i in tqdm(range(n_captions), desc="eval captions", unit="image", disable=not show):
        scene = scenes.sample_scene(rng)
        got = pipe.understand(to_pixels(scenes.render(scene, size), size), scenes.caption_question(rng))
        ok = scenes.scene_matches(scenes.scene_specs(scene), scenes.parse_objects(got))
        cap_ok += ok
        if i < 5:
            examples.append({"truth": scenes.caption(scene), "output": got, "correct": bool(ok)})
    vqa_acc = vqa_ok / max(1, n_vqa)
    cap_acc = cap_ok / max(1, n_captions)
    n = n_vqa + n_captions
    return {"vqa_accuracy": vqa_acc, "caption_accuracy": cap_acc,
            "understanding_accuracy": (vqa_ok + cap_ok) / max(1, n),
            "vqa_by_answer_kind": {k: hit / total for k, (hit, total) in sorted(kinds.items())},
            "caption_examples": examples}


def eval_generation(pipe: Pipeline, n: int, seed: int, sampling: SamplingConfig | None, show: bool = True) -> dict:
    rng = held_out_rng(seed, "generation")
    score, examples = ShapesScore(), []
    for i in tqdm(range(n), desc="eval generation", unit="prompt", disable=not show):
        scene = scenes.sample_scene(rng)
        prompt = scenes.generation_prompt(scene, rng)
        image = pipe.generate(prompt, sampling, seed=seed + i)
        ok = score.add(scenes.parse_objects(prompt), detect(image))
        if i < 5:
            examples.append({"prompt": prompt, "passed": bool(ok)})
    return {**score.summary(), "examples": examples}


@torch.no_grad()
def vae_round_trip(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor | None:
    """Pixels -> VAE encoder mean -> VAE decoder: the ceiling of any reconstruction through the
    VAE. Only the PyTorch reference has the encoder (exported graphs ship the decoder alone)."""
    model = getattr(pipe.g, "model", None)
    if model is None:
        return None
    mean, _ = model.vae.encoder(pixels)
    return model.vae.decoder(mean).clamp(-1, 1)


def eval_reconstruction(pipe: Pipeline, n: int, seed: int, sampling: SamplingConfig | None, show: bool = True) -> dict:
    """Scenes -> discrete ids -> DiT -> VAE decoder, scored like text-to-image. `vae_round_trip`
    scores the VAE alone on the same scenes, the ceiling of the whole path (None where the backend
    has no VAE encoder)."""
    size = pipe.cfg.vision.image_size
    rng = held_out_rng(seed, "reconstruction")
    score, vae_score, psnrs = ShapesScore(), ShapesScore(), []
    for i in tqdm(range(n), desc="eval reconstruction", unit="image", disable=not show):
        scene = scenes.sample_scene(rng)
        pixels = to_pixels(scenes.render(scene, size), size)
        specs = scenes.scene_specs(scene)
        out = pipe.reconstruct(pixels, sampling, seed=seed + i)
        score.add(specs, detect(to_image(out)))
        psnrs.append(image_psnr(pixels, out, data_range=2.0))  # pixels span [-1, 1]: peak-to-peak 2
        ceiling = vae_round_trip(pipe, pixels)
        if ceiling is not None:
            vae_score.add(specs, detect(to_image(ceiling)))
    return {**score.summary(), "pixel_psnr_db": float(np.mean(psnrs)) if psnrs else None,
            "vae_round_trip": vae_score.summary() if vae_score.prompts else None}


def users_drawing(rng: np.random.Generator) -> tuple[Image.Image, tuple[str, str, str]]:
    """One shape drawn with PIL the way a user might: a canvas of any size and aspect (96-480 px on
    the short side, up to 1.6:1), a plain light background, the palette colour +-15 per channel,
    the shape undistorted on the canvas (so stretched once resized to the square input), anywhere in
    the middle 60% of its cell, aliased. Returns the image and its (shape, colour, position)."""
    aspect = float(np.exp(rng.uniform(-np.log(1.6), np.log(1.6))))
    short = int(rng.integers(96, 481))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    shape, color = scenes.SHAPES[rng.integers(len(scenes.SHAPES))], list(scenes.COLORS)[rng.integers(len(scenes.COLORS))]
    cell = int(rng.integers(len(scenes.POSITIONS)))
    r = float(rng.uniform(0.07, 0.13)) * short
    center = []
    for index, side in ((cell % 3, w), (cell // 3, h)):
        c = ((index + 0.5) / 3 + rng.uniform(-0.1, 0.1)) * side
        center.append(float(np.clip(c, 1.2 * r, side - 1.2 * r)))  # inside the canvas, still in its cell
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in scenes.COLORS[color])
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(228, 256, size=3)))
    scenes.draw_shape(ImageDraw.Draw(img), shape, fill, center[0], center[1], r)
    return img, (shape, color, scenes.POSITIONS[cell])


def eval_drawings(pipe: Pipeline, n: int, seed: int, show: bool = True) -> dict:
    """Captions of `users_drawing` pictures: the issue asks that a user's own picture work as well
    as a generated scene."""
    rng = held_out_rng(seed, "drawings")
    ok_count, examples = 0, []
    for i in tqdm(range(n), desc="eval drawings", unit="drawing", disable=not show):
        img, truth = users_drawing(rng)
        got = pipe.understand(img, scenes.caption_question(rng))
        ok = scenes.scene_matches([scenes.ObjectSpec(*truth)], scenes.parse_objects(got))
        ok_count += ok
        if i < 5:
            examples.append({"truth": " ".join(truth), "size": list(img.size), "output": got, "correct": bool(ok)})
    return {"caption_accuracy": ok_count / n if n else None, "drawings": n, "examples": examples}


def evaluate(pipe: Pipeline, ecfg: EvalConfig, show: bool = True) -> dict:
    t0 = time.time()
    report = {"schema": EVAL_SCHEMA,
              "understanding": eval_understanding(pipe, ecfg.vqa, ecfg.captions, ecfg.seed, show),
              "generation": eval_generation(pipe, ecfg.generation, ecfg.seed, ecfg.sampling, show),
              "reconstruction": eval_reconstruction(pipe, ecfg.reconstruction, ecfg.seed, ecfg.sampling, show),
              "drawings": eval_drawings(pipe, ecfg.drawings, ecfg.seed, show)}
    report["seconds"] = round(time.time() - t0, 1)
    report["settings"] = {"seed": ecfg.seed, "vqa": ecfg.vqa, "captions": ecfg.captions,
                          "generation": ecfg.generation, "reconstruction": ecfg.reconstruction,
                          "drawings": ecfg.drawings,
                          "sampling": vars(ecfg.sampling)}
    return report


def sample_grid(pipe: Pipeline, path: str, n: int = 12, seed: int = 0, sampling: SamplingConfig | None = None) -> float:
    """A figure of held-out prompts and their generated images, each marked with its ShapesEval
    verdict. Returns the fraction that passed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = held_out_rng(seed, "grid")
    cols = 4
    rows = (n + cols - 1) // cols
    # Constrained layout sizes each row's title band, so a four-line prompt cannot overlap the
    # image above it (tight_layout let them collide).
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.2), layout="constrained")
    passed = 0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        scene = scenes.sample_scene(rng)
        prompt = scenes.generation_prompt(scene, rng)
        image = pipe.generate(prompt, sampling, seed=seed + i)
        ok = scenes.scene_matches(scenes.parse_objects(prompt), detect(image))
        passed += ok
        ax.imshow(image)
        ax.set_title(textwrap.fill(prompt, 30) + f"\n[{'pass' if ok else 'fail'}]", fontsize=7,
                     color="darkgreen" if ok else "firebrick")
    fig.suptitle(f"manzano-edge tiny: held-out prompts (ShapesEval {passed}/{n})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return passed / n
