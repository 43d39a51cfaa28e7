"""Image grids: tensors in [-1, 1] to a PNG that people look at."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] to (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int = 8, scale: int = 4) -> None:
    """Tile images into rows of ``ncol`` with a 2-pixel gap, upscaled ``scale`` times."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    gap = 2
    canvas = np.full((nrow * (h + gap) + gap, ncol * (w + gap) + gap, c), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, q = divmod(i, ncol)
        y, x = gap + r * (h + gap), gap + q * (w + gap)
        canvas[y : y + h, x : x + w] = img
    picture = Image.fromarray(canvas)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)
