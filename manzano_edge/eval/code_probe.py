"""How much shape the discrete image codes carry: the diagnostic behind the README's
"Generation is still limited by the codes".

Two measurements on single-object scenes:
- controlled: each scene rendered once per shape (same colour, place, size, background); how
  often two shapes get identical ids, and how many of the tokens differ on average;
- probe: a small MLP trained on the FSQ codes of `n_train` scenes reads the shape of `n_test`
  held-out ones (1/3 is chance). The DiT sees only these codes, so its shape accuracy is bounded
  by what they carry.

    manzano-edge probe-codes [CHECKPOINT] [--json out.json]
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.models.manzano import Manzano

BATCH = 256


@torch.no_grad()
def _codes(model: Manzano, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, N], FSQ codes flattened [B, N * code_dim]) for PIL images."""
    size = model.cfg.vision.image_size
    ids = torch.cat([model.tokenizer.image_to_ids(torch.cat([to_pixels(im, size) for im in images[i:i + BATCH]]))
                     for i in range(0, len(images), BATCH)])
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


def shape_probe(model: Manzano, n_train: int, n_test: int, rng: np.random.Generator, steps: int = 3000) -> dict:
    size = model.cfg.vision.image_size

    def dataset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = _single_object_scenes(rng, n)
        _, codes = _codes(model, [scenes.render(s, size) for s in picked])
        return codes, torch.tensor([scenes.SHAPES.index(s.objects[0].shape) for s in picked])

    x_train, y_train = dataset(n_train)
    x_test, y_test = dataset(n_test)
    probe = nn.Sequential(nn.Linear(x_train.shape[1], 256), nn.GELU(), nn.Linear(256, len(scenes.SHAPES)))
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (min(BATCH, n_train),), generator=generator)
        loss = nn.functional.cross_entropy(probe(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = float((probe(x_train).argmax(1) == y_train).float().mean())
        test_acc = float((probe(x_test).argmax(1) == y_test).float().mean())
    return {"train_scenes": n_train, "test_scenes": n_test, "train_accuracy": train_acc, "test_accuracy": test_acc,
            "chance": 1 / len(scenes.SHAPES)}


def code_probe(model: Manzano, n_controlled: int = 200, n_train: int = 4000, n_test: int = 800,
               seed: int = 7) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.eval().float()
    return {"fsq_levels": model.cfg.vision.fsq_levels, "controlled": controlled_shape_swap(model, n_controlled, rng),
            "probe": shape_probe(model, n_train, n_test, rng)}

