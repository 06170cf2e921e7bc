"""Procedural, seedable scene domain: a few coloured shapes on a light background.

A `Scene` is the ground truth; `render` draws it; the phrasing functions turn it into
captions, questions/answers and text-to-image prompts with varied wording. `parse_objects`
goes back from free text to object specs (for prompts a user types and for scoring
captions), by keywords, so it does not depend on any one template.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS = ((255, 255, 255), (245, 242, 232), (236, 242, 248), (242, 248, 238), (250, 240, 240))

# Several ways to say each position; index 0 is the canonical answer.
POSITION_PHRASES = {
    "top left": ["at the top left", "in the top left corner", "in the upper left", "at the top-left",
                 "in the upper left corner"],
    "top": ["at the top", "at the top center", "in the upper middle", "at the top middle"],
    "top right": ["at the top right", "in the top right corner", "in the upper right", "at the top-right",
                  "in the upper right corner"],
    "left": ["on the left", "at the left", "in the middle left", "on the left side"],
    "center": ["in the center", "in the middle", "at the center", "in the centre"],
    "right": ["on the right", "at the right", "in the middle right", "on the right side"],
    "bottom left": ["at the bottom left", "in the bottom left corner", "in the lower left", "at the bottom-left",
                    "in the lower left corner"],
    "bottom": ["at the bottom", "at the bottom center", "in the lower middle", "at the bottom middle"],
    "bottom right": ["at the bottom right", "in the bottom right corner", "in the lower right", "at the bottom-right",
                     "in the lower right corner"],
}
CAPTION_QUESTIONS = ("describe the image.", "what is in this picture?", "caption this image.", "what do you see?",
                     "describe this picture briefly.", "write a caption for the image.", "what does the image show?",
                     "tell me what is in this image", "what's in the picture?", "describe what you see.",
                     "what is shown here?")
GENERATION_TEMPLATES = ("{}", "a picture of {}", "draw {}", "generate an image of {}", "an image with {}",
                        "please draw {}", "show me {}", "create a picture with {}", "render {}", "paint {}",
                        "please paint {}", "make a picture of {}", "i want {}")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str
    size: float = 0.105  # half-extent as a fraction of the image side
    jitter: tuple[float, float] = (0.0, 0.0)
    aspect: float = 1.0  # width / height of the drawn shape, as a non-square picture resized to square has
    tint: tuple[int, int, int] = (0, 0, 0)  # added to the palette colour: a user's red is not exactly ours

    def fill(self) -> tuple[int, int, int]:
        return tuple(int(min(255, max(0, c + t))) for c, t in zip(COLORS[self.color], self.tint))

    def center(self) -> tuple[float, float]:
        cell = POSITIONS.index(self.position)
        return ((cell % 3) + 0.5) / 3 + self.jitter[0], ((cell // 3) + 0.5) / 3 + self.jitter[1]

    def half_extent(self) -> tuple[float, float]:
        """Conservative half width / height (the triangle is the widest shape: 1.15 x size)."""
        stretch = self.aspect ** 0.5
        return 1.15 * self.size * stretch, 1.15 * self.size / stretch


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (255, 255, 255)

    def sorted_objects(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: POSITIONS.index(o.position))


# "Loose" scenes (training data only) look like a user's own drawing: the object anywhere in its
# cell, smaller or larger, stretched as a non-square picture is when resized to the square input,
# its colour a little off the palette, on any light background. Canonical scenes sit within +-0.025
# of the cell centre, unstretched, in the exact palette on one of five backgrounds; a model trained
# on them only captioned 0.99 of held-out scenes and 0.28 of `eval --drawings` pictures.
LOOSE_JITTER = 0.11  # of a cell's half-width 1/6, so the centre (which names the position) stays inside
LOOSE_SIZE = (0.065, 0.14)
LOOSE_ASPECT = 1.5  # width / height drawn log-uniformly in [1/1.5, 1.5]
LOOSE_TINT = 20  # per channel, uniform in [-20, 20]
LOOSE_BACKGROUND = (225, 256)  # per channel
LOOSE_TRIES = 50


def sample_scene(rng: np.random.Generator, max_objects: int = 2, two_object_share: float | None = None,
                 loose: bool = False) -> Scene:
    """`two_object_share` (training data only): the chance of two objects instead of a uniform count.
    None keeps the uniform draw, so held-out streams are those of earlier releases. `loose` (training
    data only) draws the layout as LOOSE_* describe; objects stay inside the image and never touch."""
    if two_object_share is None:
        count = int(rng.integers(1, max_objects + 1))
    else:
        count = 2 if rng.random() < two_object_share else 1
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    # Canonical: each object's draws in turn (shape, colour, size, jitter), the order of every
    # earlier release, so held-out streams stay the same.
    objects = tuple(_canonical_object(rng, SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                                      POSITIONS[c]) for c in cells) if not loose else None
    if loose:
        kinds = [(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], POSITIONS[c])
                 for c in cells]
        objects = _loose_layout(rng, kinds) or tuple(_canonical_object(rng, *kind) for kind in kinds)
        tinted = tuple(dataclasses.replace(o, tint=tuple(int(t) for t in rng.integers(-LOOSE_TINT, LOOSE_TINT + 1, 3)))
                       for o in objects)
        return Scene(tinted, tuple(int(v) for v in rng.integers(*LOOSE_BACKGROUND, size=3)))
    return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def canonical_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same objects (shape, colour, position) laid out as a canonical scene: what a prompt for a
    loose scene should generate, since generation targets stay canonical."""
    objects = tuple(_canonical_object(rng, o.shape, o.color, o.position) for o in scene.objects)
    return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def _canonical_object(rng: np.random.Generator, shape: str, color: str, position: str) -> SceneObject:
    return SceneObject(shape, color, position, size=float(rng.uniform(0.085, 0.125)),
                       jitter=(float(rng.uniform(-0.025, 0.025)), float(rng.uniform(-0.025, 0.025))))


def _loose_layout(rng: np.random.Generator, kinds: list[tuple[str, str, str]]) -> tuple[SceneObject, ...] | None:
    for _ in range(LOOSE_TRIES):
        objects = tuple(
            SceneObject(shape, color, position, size=float(rng.uniform(*LOOSE_SIZE)),
                        jitter=(float(rng.uniform(-LOOSE_JITTER, LOOSE_JITTER)),
                                float(rng.uniform(-LOOSE_JITTER, LOOSE_JITTER))),
                        aspect=float(np.exp(rng.uniform(-np.log(LOOSE_ASPECT), np.log(LOOSE_ASPECT)))))
            for shape, color, position in kinds
        )
        if all(_inside(o) for o in objects) and not any(
                _touch(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            return objects
    return None  # the caller falls back to a canonical layout


def _inside(obj: SceneObject, margin: float = 0.01) -> bool:
    (cx, cy), (hw, hh) = obj.center(), obj.half_extent()
    return margin <= cx - hw and cx + hw <= 1 - margin and margin <= cy - hh and cy + hh <= 1 - margin


def _touch(a: SceneObject, b: SceneObject, gap: float = 0.02) -> bool:
    (ax, ay), (aw, ah) = a.center(), a.half_extent()
    (bx, by), (bw, bh) = b.center(), b.half_extent()
    return abs(ax - bx) < aw + bw + gap and abs(ay - by) < ah + bh + gap


def render(scene: Scene, size: int = 96, supersample: int = 2) -> Image.Image:
    """Draw at `supersample`x then downsample, for anti-aliased edges."""
    big = size * supersample
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy = obj.center()
        cx, cy, r = cx * big, cy * big, obj.size * big
        draw_shape(draw, obj.shape, obj.fill(), cx, cy, r, obj.aspect)
    return img.resize((size, size), Image.LANCZOS)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], cx: float, cy: float, r: float,
               aspect: float = 1.0) -> None:
    """One shape of half-extent `r` around (cx, cy) in pixels, stretched to width/height `aspect`."""
    sx, sy = aspect ** 0.5, aspect ** -0.5  # area-preserving
    if shape == "circle":
        draw.ellipse([cx - r * sx, cy - r * sy, cx + r * sx, cy + r * sy], fill=fill)
    elif shape == "square":
        s = r * 0.9  # equal area-ish to the circle, so size alone does not give the shape away
        draw.rectangle([cx - s * sx, cy - s * sy, cx + s * sx, cy + s * sy], fill=fill)
    else:
        draw.polygon([(cx, cy - r * 1.1 * sy), (cx - r * 1.15 * sx, cy + r * 0.9 * sy),
                      (cx + r * 1.15 * sx, cy + r * 0.9 * sy)], fill=fill)


# -- text ---------------------------------------------------------------------------------
def describe_object(obj: SceneObject, rng: np.random.Generator | None = None) -> str:
    phrases = POSITION_PHRASES[obj.position]
    where = phrases[0] if rng is None else phrases[rng.integers(len(phrases))]
    article = "a" if rng is None or rng.random() < 0.8 else "one"
    return f"{indefinite(obj.color) if article == 'a' else article} {obj.color} {obj.shape} {where}"


def indefinite(word: str) -> str:
    """The indefinite article before `word`: "an orange", "a red"."""
    return "an" if word[:1] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Canonical caption when rng is None (the understanding target); varied wording otherwise."""
    return " and ".join(describe_object(o, rng) for o in scene.sorted_objects())


def generation_prompt(scene: Scene, rng: np.random.Generator) -> str:
    template = GENERATION_TEMPLATES[rng.integers(len(GENERATION_TEMPLATES))]
    return template.format(caption(scene, rng))


def caption_question(rng: np.random.Generator) -> str:
    return CAPTION_QUESTIONS[rng.integers(len(CAPTION_QUESTIONS))]


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


# The kinds of VQA question `question_answer` draws ("color_of" only when the object's shape is unique):
# count, "what shape is on the left?", "what color is the shape on the left?", "where is the red
# circle?", "is there a red circle?", "what color is the circle?".
QUESTION_KINDS = ("count", "shape_at", "color_at", "where", "exists", "color_of")


def question_answer(scene: Scene, rng: np.random.Generator, hard_negative_rate: float = 0.0,
                    question_weights: dict[str, float] | None = None) -> tuple[str, str]:
    """One VQA pair about the scene, drawn from several question kinds and phrasings.

    `hard_negative_rate` (training data only) is the share of "is there" distractors that are a real
    object with one attribute changed. Random distractors rarely differ from a real object in one
    attribute only, and a decoder trained on them alone answered "yes" to 70% of absent objects: it
    never had to bind colour to shape. At 0 the draws are exactly those of earlier releases, so the
    held-out eval set stays comparable.

    `question_weights` (training data only) maps a kind (`QUESTION_KINDS`) to how many times likelier
    it is than an unlisted kind; empty or None keeps the one uniform draw of earlier releases."""
    objs = list(scene.objects)
    obj = objs[rng.integers(len(objs))]
    where = _pick(rng, POSITION_PHRASES[obj.position])
    unique_shape = sum(o.shape == obj.shape for o in objs) == 1
    kinds = [k for k in QUESTION_KINDS if k != "color_of" or unique_shape]
    if not question_weights:
        kind = _pick(rng, kinds)
    else:
        weights = np.array([question_weights.get(k, 1.0) for k in kinds])
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    if kind == "count":
        q = _pick(rng, ["how many shapes are there?", "how many objects are in the image?", "count the shapes.",
                        "how many things do you see?"])
        return q, COUNT_WORDS[len(objs)]
    if kind == "color_of":
        q = _pick(rng, ["what color is the {}?", "which color is the {}?", "what is the color of the {}?",
                        "the {} is what color?", "which colour does the {} have?", "what colour is the {}?",
                        "what color does the {} have?"]).format(obj.shape)
        return q, obj.color
    if kind == "shape_at":
        q = _pick(rng, ["what shape is {}?", "which shape is {}?", "what kind of shape is {}?"]).format(where)
        return q, obj.shape
    if kind == "color_at":
        q = _pick(rng, ["what color is the shape {}?", "what color is the object {}?",
                        "which color is the shape {}?", "what colour is the shape {}?"]).format(where)
        return q, obj.color
    if kind == "where":
        if sum(o.shape == obj.shape and o.color == obj.color for o in objs) > 1:
            return "how many shapes are there?", COUNT_WORDS[len(objs)]
        q = _pick(rng, ["where is the {} {}?", "where is the {} {} located?", "in which part of the image is the {} {}?",
                        "where can you see the {} {}?"]).format(obj.color, obj.shape)
        return q, obj.position
    # exists: half real objects, half distractors (one draw, so the stream is unchanged at rate 0)
    draw = rng.random()
    if draw < 0.5:
        color, shape = obj.color, obj.shape
    elif draw < 0.5 + 0.5 * hard_negative_rate:
        color, shape = _one_attribute_changed(obj, rng)
    else:
        color, shape = _pick(rng, list(COLORS)), _pick(rng, SHAPES)
    present = any(o.color == color and o.shape == shape for o in objs)
    q = _pick(rng, ["is there a {} {}?", "is there a {} {} in the image?", "do you see a {} {}?",
                    "does the image contain a {} {}?"]).format(color, shape)
    return q, "yes" if present else "no"


def _one_attribute_changed(obj: SceneObject, rng: np.random.Generator) -> tuple[str, str]:
    """The object's colour with another shape, or its shape with another colour."""
    if rng.random() < 0.5:
        return obj.color, _pick(rng, [s for s in SHAPES if s != obj.shape])
    return _pick(rng, [c for c in COLORS if c != obj.color]), obj.shape


# -- parsing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """What a piece of text asks for; None means "not specified"."""

    shape: str | None
    color: str | None
    position: str | None


def _position_in(text: str) -> str | None:
    words = set(re.findall(r"[a-z]+", text.replace("-", " ")))
    vertical = "top" if words & {"top", "upper"} else "bottom" if words & {"bottom", "lower"} else None
    horizontal = "left" if "left" in words else "right" if "right" in words else None
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "center" if words & {"center", "centre", "middle"} else None


def parse_objects(text: str) -> list[ObjectSpec]:
    """Object specs in free text: 'draw a red circle in the upper left and a blue square'."""
    specs = []
    for chunk in re.split(r"\band\b|,|;", text.lower()):
        shape = next((s for s in SHAPES if re.search(rf"\b{s}s?\b", chunk)), None)
        color = next((c for c in COLORS if re.search(rf"\b{c}\b", chunk)), None)
        if shape or color:
            specs.append(ObjectSpec(shape, color, _position_in(chunk)))
        elif specs and specs[-1].position is None and _position_in(chunk):
            specs[-1] = ObjectSpec(specs[-1].shape, specs[-1].color, _position_in(chunk))
    return specs


def scene_matches(specs: list[ObjectSpec], found: list[ObjectSpec]) -> bool:
    """True when `found` has exactly as many objects as `specs` and they pair up one to one
    with every specified attribute equal."""
    if len(specs) != len(found):
        return False
    remaining = list(found)
    for spec in specs:
        match = next((f for f in remaining if all(getattr(spec, a) in (None, getattr(f, a))
                                                    for a in ("shape", "color", "position"))), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def cell_labels(text: str) -> tuple[list[int], list[int]] | None:
    """Per-position class labels for the 3x3 grid, from a description of the whole scene:
    (shape ids, color ids), 0 meaning "empty", else 1 + the index in SHAPES / COLORS. None
    when the text does not pin every object's shape, color and position (then the empty
    cells are unknown too)."""
    specs = parse_objects(text)
    if not specs or any(None in (s.shape, s.color, s.position) for s in specs):
        return None
    shape, color = [0] * len(POSITIONS), [0] * len(POSITIONS)
    for spec in specs:
        cell = POSITIONS.index(spec.position)
        shape[cell], color[cell] = 1 + SHAPES.index(spec.shape), 1 + list(COLORS).index(spec.color)
    return shape, color


def scene_specs(scene: Scene) -> list[ObjectSpec]:
    return [ObjectSpec(o.shape, o.color, o.position) for o in scene.objects]
