"""Procedural class-conditional images: the testbed's data set.

Each class is a kind of picture with its own amount of fine spatial detail, so
that a patch scheduler has something to adapt to: a smooth ``glow`` needs
almost no detail, ``stripes`` needs it at every pixel. All classes are drawn
with torch from one seeded generator, so a (seed, n) pair always gives the
same images, and 20,000 of them take seconds.

Images are 3 x 32 x 32, values in [-1, 1]. Classes are referred to by short
prompt names (``PROMPTS``), which users type on the command line.
"""

from __future__ import annotations

import math

import torch

IMAGE_SIZE = 32
CHANNELS = 3

#: Prompt names in class-id order, from the least to the most fine detail.
PROMPTS: tuple[str, ...] = ("glow", "moon", "shapes", "stripes")


def class_id(prompt: str) -> int:
    """The class id of a prompt name, or an error that lists the known names."""
    try:
        return PROMPTS.index(prompt)
    except ValueError:
        raise ValueError(
            f"unknown prompt {prompt!r}; the testbed knows: {', '.join(PROMPTS)}"
        ) from None


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1], shaped (n, 1, H, W) for broadcasting."""
    c = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy.expand(n, 1, -1, -1), xx.expand(n, 1, -1, -1)


def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _color(g: torch.Generator, n: int) -> torch.Tensor:
    return _u(g, n, CHANNELS, 1, 1, lo=-1.0, hi=1.0)


def _mix(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * alpha


def _edge(signed_distance: torch.Tensor) -> torch.Tensor:
    """Anti-aliased inside-mask from a signed distance in pixels (> 0 inside)."""
    return torch.sigmoid(signed_distance * 3.0)


def _glow(g: torch.Generator, n: int) -> torch.Tensor:
    """A soft Gaussian light on a dark background: almost no detail."""
    yy, xx = _grid(n)
    cy, cx = _u(g, n, 1, 1, 1, lo=0.25, hi=0.75), _u(g, n, 1, 1, 1, lo=0.25, hi=0.75)
    radius = _u(g, n, 1, 1, 1, lo=0.15, hi=0.35)
    light = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    background = _u(g, n, CHANNELS, 1, 1, lo=-1.0, hi=-0.4)
    glow = _u(g, n, CHANNELS, 1, 1, lo=0.0, hi=1.0)
    return _mix(background, glow, light)


def _moon(g: torch.Generator, n: int) -> torch.Tensor:
    """A moon over rolling hills under a graded sky: a few large edges."""
    yy, xx = _grid(n)
    top, bottom = _color(g, n), _color(g, n)
    sky = _mix(top, bottom, yy)
    cy, cx = _u(g, n, 1, 1, 1, lo=0.15, hi=0.35), _u(g, n, 1, 1, 1, lo=0.2, hi=0.8)
    r = _u(g, n, 1, 1, 1, lo=0.08, hi=0.14)
    moon = _edge((r - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()) * IMAGE_SIZE)
    image = _mix(sky, torch.full_like(sky, 0.9), moon)
    base, amp = _u(g, n, 1, 1, 1, lo=0.6, hi=0.75), _u(g, n, 1, 1, 1, lo=0.04, hi=0.1)
    freq, phase = _u(g, n, 1, 1, 1, lo=0.7, hi=1.6), _u(g, n, 1, 1, 1, hi=2 * math.pi)
    ridge = base + amp * torch.sin(2 * math.pi * freq * xx + phase)
    hill = _edge((yy - ridge) * IMAGE_SIZE)
    hill_color = _u(g, n, CHANNELS, 1, 1, lo=-1.0, hi=-0.2)
    return _mix(image, hill_color, hill)


def _shapes(g: torch.Generator, n: int, count: int = 3) -> torch.Tensor:
    """A few flat discs and boxes on a flat background: edges and corners."""
    yy, xx = _grid(n)
    image = _color(g, n).expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE)
    for _ in range(count):
        cy, cx = _u(g, n, 1, 1, 1, lo=0.2, hi=0.8), _u(g, n, 1, 1, 1, lo=0.2, hi=0.8)
        half = _u(g, n, 1, 1, 1, lo=0.08, hi=0.18)
        disc = half - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        box = half - torch.maximum((yy - cy).abs(), (xx - cx).abs())
        is_disc = _u(g, n, 1, 1, 1) < 0.5
        mask = _edge(torch.where(is_disc, disc, box) * IMAGE_SIZE)
        image = _mix(image, _color(g, n), mask)
    return image


def _stripes(g: torch.Generator, n: int) -> torch.Tensor:
    """Hard-edged axis-aligned stripes of a 4 or 6 pixel period: detail everywhere."""
    yy, xx = _grid(n)
    vertical = _u(g, n, 1, 1, 1) < 0.5
    coord = torch.where(vertical, xx, yy) * IMAGE_SIZE
    period = torch.where(_u(g, n, 1, 1, 1) < 0.5, 4.0, 6.0)
    offset = torch.floor(_u(g, n, 1, 1, 1) * period)
    on = torch.remainder(torch.floor(coord) + offset, period) < period / 2
    a = _color(g, n)
    b = -a.sign() * _u(g, n, CHANNELS, 1, 1, lo=0.5, hi=1.0)  # contrast with a
    return torch.where(on, a, b)


_RENDERERS = (_glow, _moon, _shapes, _stripes)


def make_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Render one image per label; the result depends only on (labels, seed)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    images = torch.empty(len(labels), CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    for cls, render in enumerate(_RENDERERS):
        idx = (labels == cls).nonzero().flatten()
        if len(idx):
            g = torch.Generator().manual_seed(seed * len(_RENDERERS) + cls)
            images[idx] = render(g, len(idx))
    return images.clamp(-1.0, 1.0)


def make_dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with balanced, shuffled labels: (images, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(PROMPTS)
    labels = labels[torch.randperm(n, generator=g)]
    return make_images(labels, seed), labels
