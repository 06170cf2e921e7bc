"""Loading user images: any size, any mode; one clear error for anything unreadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from manzano_edge.errors import UserError


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
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] or [1, 3, H, W] in [-1, 1] -> PIL RGB."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")
