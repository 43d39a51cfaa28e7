"""Image grids: tensors in [-1, 1] to a PNG that people look at."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] to (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int = 8, scale: int = 4,
              row_labels: Sequence[str] | None = None) -> None:
    """Tile images into rows of ``ncol`` with a 2-pixel gap, upscaled ``scale`` times; ``row_labels``
    are written left of their rows, so that a grid says what it shows on its own."""
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
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if row_labels:
        picture = _with_row_labels(picture, row_labels, (h + gap) * scale, gap * scale)
    picture.save(path)


def _with_row_labels(picture: Image.Image, labels: Sequence[str], row_height: int, top: int) -> Image.Image:
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    margin = max(int(draw.textlength(label, font=font)) for label in labels) + 12
    labelled = Image.new(picture.mode, (picture.width + margin, picture.height), "white")
    labelled.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for r, label in enumerate(labels):
        draw.text((6, top + r * row_height + row_height // 2), label, fill="black", font=font, anchor="lm")
    return labelled
