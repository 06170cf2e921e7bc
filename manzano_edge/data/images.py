"""Loading user images: any size, any mode; one clear error for anything unreadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from manzano_edge.errors import UserError

# The graphs' pixels encode 8-bit RGB: x = u / PIXEL_HALF_RANGE - 1 maps [0, 255] onto [-1, 1]. Every
# converter that takes 8-bit images (Core ML's ImageType, the LLM runners' uint8 image) uses this.
PIXEL_HALF_RANGE = 127.5


def pixels_from_uint8(u: torch.Tensor | np.ndarray) -> torch.Tensor:
    """8-bit RGB (any layout) -> float pixels in [-1, 1]."""
    if not isinstance(u, torch.Tensor):
        u = torch.from_numpy(np.array(u))  # a copy: PIL's arrays are read-only
    return u.to(torch.float32) / PIXEL_HALF_RANGE - 1.0


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels -> the nearest 8-bit values (clamped to [-1, 1] first), same layout."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * PIXEL_HALF_RANGE).round().to(torch.uint8)


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: not a valid image file ({type(exc).__name__}); "
                        "pass a PNG or JPEG") from exc


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> [1, 3, size, size] float in [-1, 1].

    Grayscale/palette/alpha images are converted to RGB (alpha composited on white) and any
    size is resized to the model's square input, so relative positions are preserved.
    """
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    return pixels_from_uint8(np.asarray(img)).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] or [1, 3, H, W] in [-1, 1] -> PIL RGB."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    return Image.fromarray(pixels_to_uint8(pixels).permute(1, 2, 0).numpy(), "RGB")
