"""Spectral FD: known answers on testbed images (issue 13)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddit.testbed.data import make_dataset
from ddit.testbed.spectrum import POWER_FLOOR, RadialSpectrum, spectral_fd

N = 256


@pytest.fixture(scope="module")
def reals():
    return [make_dataset(N, seed)[0] for seed in (7001, 7002, 7003)]


def test_a_sinusoid_puts_its_power_into_its_own_band():
    x = torch.arange(32.0)
    for k in (1, 5, 12):
        wave = (0.5 + 0.25 * torch.cos(2 * math.pi * k * x / 32)).expand(1, 3, 32, 32)
        bands = RadialSpectrum()(wave).reshape(3, 16)
        assert bands.argmax(dim=1).tolist() == [k - 1] * 3
        others = torch.ones(16, dtype=torch.bool)
        others[k - 1] = False
        assert torch.allclose(bands[:, others], torch.tensor(math.log(POWER_FLOOR)), atol=1e-3)  # nothing else


def test_noise_and_blur_each_move_it_far_beyond_its_spread_between_seed_sets(reals):
    a, b, c = reals
    real = [spectral_fd(a, b), spectral_fd(a, c)]
    spread = max(real) - min(real)
    noisy = b + 0.05 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    blurred = F.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=False)
    for corrupted in (noisy, blurred):
        assert spectral_fd(a, corrupted) > max(real) + 10 * spread
    assert spectral_fd(a, a) < 1e-3  # a set against itself: at the floor
