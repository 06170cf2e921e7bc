"""Recipes and which backend implements each one natively.

| recipe   | weights                     | activations                     |
|----------|-----------------------------|---------------------------------|
| fp32     | float32                     | float32                         |
| fp16     | float16                     | float16                         |
| w8       | int8 per-channel / block 32 | float                           |
| w8a8     | int8 per-channel            | int8 (dynamic per-token/static) |
| w4       | int4 per-group (group 32)   | int8 dynamic (XNNPACK) / float  |
| palette4 | 4-bit k-means LUT           | float                           |

A combination a backend cannot do raises a clear error; it is never silently exported in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from manzano_edge.errors import UserError

# One place for the recipes' constants.
GROUP_SIZE = 32  # int4 (and MatMulNBits int8) weight group; every Linear input width is a multiple of it
PALETTE_GROUP_SIZE = 16  # output channels that share one Core ML 4-bit LUT
W8A8_MODES = ("dynamic", "static")
# The per-graph PSNR bar `validate` applies (Apple's 35 dB); int4 weights get a sanity bar, since
# its decoder is judged by top-1 and end to end.
PSNR_BAR_DB = 35.0
PSNR_BAR_DB_W4 = 20.0


@dataclass(frozen=True)
class RecipeConfig:
    """One quantization recipe, in torchao's `quantize_(model, config)` shape: what a recipe is
    lives in its config object, which backend implements it in `SUPPORT`."""

    name: ClassVar[str]
    weights: ClassVar[str]
    activations: ClassVar[str]
    psnr_bar_db: ClassVar[float] = PSNR_BAR_DB

    @property
    def is_float(self) -> bool:
        return False


@dataclass(frozen=True)
class Fp32Config(RecipeConfig):
    name: ClassVar[str] = "fp32"
    weights: ClassVar[str] = "float32"
    activations: ClassVar[str] = "float32"

    @property
    def is_float(self) -> bool:
        return True


@dataclass(frozen=True)
class Fp16Config(Fp32Config):
    name: ClassVar[str] = "fp16"
    weights: ClassVar[str] = "float16"
    activations: ClassVar[str] = "float16"


@dataclass(frozen=True)
class W8Config(RecipeConfig):
    name: ClassVar[str] = "w8"
    weights: ClassVar[str] = "int8 per-channel / block 32"
    activations: ClassVar[str] = "float"
    group_size: int = GROUP_SIZE


@dataclass(frozen=True)
class W8A8Config(RecipeConfig):
    name: ClassVar[str] = "w8a8"
    weights: ClassVar[str] = "int8 symmetric per-channel"
    activations: ClassVar[str] = "int8 (dynamic per-token, or static calibrated)"
    activation_mode: str | None = None  # one of W8A8_MODES for every format; None: each format's default


@dataclass(frozen=True)
class W4Config(RecipeConfig):
    name: ClassVar[str] = "w4"
    weights: ClassVar[str] = "int4 per-group (group 32)"
    activations: ClassVar[str] = "int8 dynamic (XNNPACK) / float"
    psnr_bar_db: ClassVar[float] = PSNR_BAR_DB_W4
    group_size: int = GROUP_SIZE


@dataclass(frozen=True)
class Palette4Config(RecipeConfig):
    name: ClassVar[str] = "palette4"
    weights: ClassVar[str] = "4-bit k-means LUT"
    activations: ClassVar[str] = "float"
    nbits: int = 4
    group_size: int = PALETTE_GROUP_SIZE


RECIPE_CONFIGS: dict[str, type[RecipeConfig]] = {c.name: c for c in (Fp32Config, Fp16Config, W8Config, W8A8Config,
                                                                      W4Config, Palette4Config)}
RECIPES = tuple(RECIPE_CONFIGS)
FLOAT_RECIPES = tuple(n for n, c in RECIPE_CONFIGS.items() if c().is_float)


def recipe_config(name: str, **options) -> RecipeConfig:
    """The config object of a recipe name (`--recipe`), refused with the choices when unknown."""
    if name not in RECIPE_CONFIGS:
        raise UserError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
    return RECIPE_CONFIGS[name](**options)


def is_float(recipe: str) -> bool:
    return recipe_config(recipe).is_float


@dataclass(frozen=True)
class Support:
    ok: bool
    how: str  # the native mechanism, or why not


# Which format implements which recipe, and how (or why not): one table, its rows registered by
# each format's exporter module (`export.base.register_exporter`).
SUPPORT: dict[tuple[str, str], Support] = {}


def register_support(fmt: str, rows: dict[str, Support], w8a8_modes: tuple[str, ...] = ()) -> None:
    """A format's rows of the table, and its w8a8 activation modes (default first) if it has w8a8."""
    missing = [r for r in RECIPES if r not in rows]
    if missing:
        raise ValueError(f"format '{fmt}' does not say whether it implements recipe '{missing[0]}'")
    if rows["w8a8"].ok and not w8a8_modes:
        raise ValueError(f"format '{fmt}' implements w8a8 but names no activation mode")
    for recipe, support in rows.items():
        SUPPORT[(fmt, recipe)] = support
    if w8a8_modes:
        W8A8_MODES_BY_FORMAT[fmt] = w8a8_modes


def formats() -> tuple[str, ...]:
    """The formats with a registered exporter, in registration order."""
    return tuple(dict.fromkeys(fmt for fmt, _ in SUPPORT))


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise UserError(f"unknown {what} '{unknown[0] if unknown else value}'; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def check_supported(fmt: str, recipe: str) -> None:
    recipe_config(recipe)
    support = SUPPORT[(fmt, recipe)]
    if not support.ok:
        raise UserError(f"recipe '{recipe}' is not available for {fmt}: {support.how}")


# The w8a8 activation modes each format implements, its default first (registered with its recipes).
W8A8_MODES_BY_FORMAT: dict[str, tuple[str, ...]] = {}


def default_w8a8_modes() -> dict[str, str]:
    """format -> its default w8a8 activation mode."""
    return {fmt: modes[0] for fmt, modes in W8A8_MODES_BY_FORMAT.items()}


def check_mode(fmt: str, mode: str) -> str:
    if mode not in W8A8_MODES:
        raise UserError(f"unknown w8a8 activation mode '{mode}' for {fmt}; choose from {', '.join(W8A8_MODES)}")
    allowed = W8A8_MODES_BY_FORMAT.get(fmt, W8A8_MODES)
    if mode not in allowed:
        raise UserError(f"{fmt} has no {mode} activation quantization; {fmt} w8a8 is {' or '.join(allowed)}")
    return mode
