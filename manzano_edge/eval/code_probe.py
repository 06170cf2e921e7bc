"""How much shape the discrete image codes and the understanding tokens carry: the diagnostics
behind "Generation is still limited by the codes" and "Where the drawing errors come from" in
docs/history.md.

Three measurements on single-object scenes:
- controlled: each scene rendered once per shape (same colour, place, size, background); how
  often two shapes get identical ids, and how many of the tokens differ on average;
- probe: a small MLP trained on the FSQ codes of `n_train` scenes reads the shape of `n_test`
  held-out ones (1/3 is chance). The DiT sees only these codes, so its shape accuracy is bounded
  by what they carry.
- understanding probe: the same probe on the continuous (understanding) tokens of loose scenes,
  scored on held-out loose scenes, canonical scenes and pictures drawn like a user's; the
  decoder's captions of a user's drawing have come in at or a little below its drawings score.

    manzano-edge probe-codes [CHECKPOINT] [--json out.json]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.models.manzano import Manzano

BATCH = 256


def _pixel_batches(model: Manzano, images: list) -> Iterator[torch.Tensor]:
    """PIL images -> model-input pixel batches of at most BATCH."""
    size = model.cfg.vision.image_size
    for i in range(0, len(images), BATCH):
        yield torch.cat([to_pixels(im, size) for im in images[i:i + BATCH]])


@torch.no_grad()
def _codes(model: Manzano, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, N], FSQ codes flattened [B, N * code_dim]) for PIL images."""
    ids = torch.cat([model.tokenizer.image_to_ids(pixels) for pixels in _pixel_batches(model, images)])
    return ids, model.tokenizer.discrete.fsq.indices_to_codes(ids).flatten(1)


def _single_object_scenes(rng: np.random.Generator, n: int) -> list[scenes.Scene]:
    return [scenes.sample_scene(rng, max_objects=1) for _ in range(n)]


def controlled_shape_swap(model: Manzano, n: int, rng: np.random.Generator) -> dict:
    size, identical, differing = model.cfg.vision.image_size, 0, []
    for scene in _single_object_scenes(rng, n):
        obj = scene.objects[0]
        images = [scenes.render(dataclasses.replace(scene, objects=(dataclasses.replace(obj, shape=s),)), size)
                  for s in scenes.SHAPES]
        ids, _ = _codes(model, images)
        pairs = [int((ids[a] != ids[b]).sum()) for a, b in ((0, 1), (0, 2), (1, 2))]
        identical += min(pairs) == 0
        differing += pairs
    return {"scenes": n, "scenes_with_two_shapes_on_identical_ids": identical,
            "mean_differing_tokens_per_shape_pair": float(np.mean(differing)),
            "tokens": model.cfg.vision.num_image_tokens}


def _fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
               steps: int = 3000, standardize: bool = False) -> dict:
    """A small MLP fitted on (x_train, y_train); its accuracy on the training set and on each named
    test set. `standardize` scales inputs by the training set's statistics (the continuous tokens
    leave an RMSNorm whose gain is ~0.02; FSQ codes are already in [-1, 1])."""
    mean, std = (x_train.mean(0), x_train.std(0) + 1e-6) if standardize else (0.0, 1.0)
    probe = nn.Sequential(nn.Linear(x_train.shape[1], 256), nn.GELU(), nn.Linear(256, len(scenes.SHAPES)))
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (min(BATCH, len(x_train)),), generator=generator)
        loss = nn.functional.cross_entropy(probe((x_train[idx] - mean) / std), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = {name: float((probe((x - mean) / std).argmax(1) == y).float().mean())
                    for name, (x, y) in {"train": (x_train, y_train), **tests}.items()}
    return {"train_scenes": len(x_train), "train_accuracy": accuracy.pop("train"),
            **{f"{name}_accuracy": value for name, value in accuracy.items()}, "chance": 1 / len(scenes.SHAPES)}


def _shape_labels(picked: list[scenes.Scene]) -> torch.Tensor:
    return torch.tensor([scenes.SHAPES.index(s.objects[0].shape) for s in picked])


def shape_probe(model: Manzano, n_train: int, n_test: int, rng: np.random.Generator, steps: int = 3000) -> dict:
    size = model.cfg.vision.image_size

    def dataset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = _single_object_scenes(rng, n)
        _, codes = _codes(model, [scenes.render(s, size) for s in picked])
        return codes, _shape_labels(picked)

    x_train, y_train = dataset(n_train)
    return {"test_scenes": n_test, **_fit_probe(x_train, y_train, {"test": dataset(n_test)}, steps)}


@torch.no_grad()
def _continuous_tokens(model: Manzano, images: list) -> torch.Tensor:
    """Understanding tokens flattened, [B, N * llm width], for PIL images."""
    return torch.cat([model.tokenizer.embed_continuous(pixels) for pixels in _pixel_batches(model, images)]).flatten(1)


def understanding_probe(model: Manzano, n_train: int, n_test: int, rng: np.random.Generator, steps: int = 3000) -> dict:
    """The same MLP probe on the continuous (understanding) tokens, trained on single-object loose
    scenes (`scenes.LOOSE_*`: off-centre, resized, stretched, tinted) and scored on held-out loose
    scenes, canonical scenes and pictures drawn like a user's (`evaluate.users_drawing`). The decoder
    reads a user's drawing through these tokens only, and the ViT under them is frozen after stage 1."""
    from manzano_edge.eval.evaluate import users_drawing

    size = model.cfg.vision.image_size

    def loose(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [scenes.sample_scene(rng, max_objects=1, loose=True) for _ in range(n)]
        return _continuous_tokens(model, [scenes.render(s, size) for s in picked]), _shape_labels(picked)

    x_train, y_train = loose(n_train)
    picked = _single_object_scenes(rng, n_test)
    drawn = [users_drawing(rng) for _ in range(n_test)]
    tests = {"loose_test": loose(n_test),
             "canonical_test": (_continuous_tokens(model, [scenes.render(s, size) for s in picked]), _shape_labels(picked)),
             "drawings": (_continuous_tokens(model, [img for img, _ in drawn]),
                          torch.tensor([scenes.SHAPES.index(truth[0]) for _, truth in drawn]))}
    return {"test_scenes": n_test, **_fit_probe(x_train, y_train, tests, steps, standardize=True)}


def code_probe(model: Manzano, n_controlled: int = 200, n_train: int = 4000, n_test: int = 800,
               seed: int = 7, steps: int = 3000) -> dict:
    """The three measurements; `steps`: Adam steps of each MLP probe."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.eval().float()
    return {"fsq_levels": model.cfg.vision.fsq_levels, "controlled": controlled_shape_swap(model, n_controlled, rng),
            "probe": shape_probe(model, n_train, n_test, rng, steps),
            "understanding_probe": understanding_probe(model, n_train, n_test, rng, steps), "probe_steps": steps}

