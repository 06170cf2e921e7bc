"""ShapesEval: a GenEval-style, rule-based (no ML) check of generated images.

The detector segments saturated pixels that differ from the background (estimated from
the border), splits them into connected components and measures each one:
- color: nearest palette color to the component's median RGB;
- shape: a triangle narrows towards the top (width at 25% height vs 75% height); otherwise
  a square fills the corners of its bounding box and a circle leaves them empty;
- position: the centroid's cell in the 3x3 grid.
A prompt passes when the detected objects pair up one to one with the requested ones, with
every requested attribute right (so count is checked too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from manzano_edge.data.scenes import COLORS, POSITIONS, SHAPES, ObjectSpec, scene_matches

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
MIN_AREA_FRACTION = 0.006  # smallest rendered object is ~0.017 of the image
TRIANGLE_TAPER = 0.7
SQUARE_CORNER_FILL = 0.6
CORNER = 0.2  # corner boxes are this fraction of the bounding box on each side


def _foreground(arr: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                             arr[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(arr - background, axis=-1)
    saturation = arr.max(-1) - arr.min(-1)
    return (distance > 60) & (saturation > 60)


def _shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = bottom - top + 1, right - left + 1
    upper = mask[top + h // 4].sum()
    lower = mask[top + (3 * h) // 4].sum()
    if lower > 0 and upper / lower < TRIANGLE_TAPER:
        return "triangle"
    box = mask[top:bottom + 1, left:right + 1]
    ch, cw = max(1, round(CORNER * h)), max(1, round(CORNER * w))
    corners = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    return "square" if np.mean([c.mean() for c in corners]) >= SQUARE_CORNER_FILL else "circle"


def detect(image: Image.Image | np.ndarray) -> list[ObjectSpec]:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    size = arr.shape[0] * arr.shape[1]
    labels, count = ndimage.label(_foreground(arr), structure=np.ones((3, 3)))
    found = []
    for index in range(1, count + 1):
        mask = labels == index
        if mask.sum() < MIN_AREA_FRACTION * size:
            continue
        color = list(COLORS)[int(np.argmin(np.linalg.norm(PALETTE - np.median(arr[mask], axis=0), axis=-1)))]
        cy, cx = ndimage.center_of_mass(mask)
        row = min(2, int(3 * cy / arr.shape[0]))
        col = min(2, int(3 * cx / arr.shape[1]))
        found.append(ObjectSpec(_shape(mask), color, POSITIONS[row * 3 + col]))
    return found


@dataclass
class ShapesScore:
    prompts: int = 0
    passed: int = 0
    count_ok: int = 0
    objects: int = 0
    color_ok: int = 0
    shape_ok: int = 0
    position_ok: int = 0

    def add(self, specs: list[ObjectSpec], found: list[ObjectSpec]) -> bool:
        ok = scene_matches(specs, found)
        self.prompts += 1
        self.passed += ok
        self.count_ok += len(specs) == len(found)
        for spec in specs:
            self.objects += 1
            self.color_ok += any(f.color == spec.color for f in found)
            self.shape_ok += any(f.shape == spec.shape for f in found)
            self.position_ok += any(f.position == spec.position for f in found)
        return ok

    def summary(self) -> dict[str, float]:
        p, o = max(1, self.prompts), max(1, self.objects)
        return {"shapes_eval": self.passed / p, "count": self.count_ok / p, "color": self.color_ok / o,
                "shape": self.shape_ok / o, "position": self.position_ok / o, "prompts": self.prompts}


__all__ = ["detect", "ShapesScore", "SHAPES"]
