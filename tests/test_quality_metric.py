"""FD on the evaluator's features, the report's headline quality metric: known answers on
testbed images (issue 13)."""

import pytest
import torch
import torch.nn.functional as F

from ddit.testbed.data import make_dataset
from ddit.testbed.evaluator import DEGRADATIONS, frechet_distance, frechet_interval, load_evaluator

N = 256


def noised(images: torch.Tensor, std: float = 0.05) -> torch.Tensor:
    return images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))


def blurred(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def reals():
    return [make_dataset(N, seed)[0] for seed in (7001, 7002, 7003)]


def test_noise_and_blur_each_worsen_fd_beyond_its_spread_between_seed_sets(evaluator, reals):
    a, b, c = reals
    real = [frechet_distance(evaluator, a, b), frechet_distance(evaluator, a, c)]
    spread = max(real) - min(real)
    for corrupted in (noised(b), blurred(b)):
        assert frechet_distance(evaluator, a, corrupted) > max(real) + spread
    assert frechet_distance(evaluator, a, a) < 1e-3  # a set against itself: at the floor


@torch.no_grad()
def test_the_degradation_head_reads_noise_and_blur_off_the_features(evaluator, reals):
    """Why FD sees them: the features carry each degradation, on its own axis."""
    images = reals[0]
    noise, blur = (DEGRADATIONS.index(name) for name in ("noise", "blur"))

    def strength(x):
        return torch.sigmoid(evaluator.degradation(evaluator.features(x))).mean(dim=0)

    clean, noisy, soft = strength(images), strength(noised(images)), strength(blurred(images))
    assert noisy[noise] > clean[noise] + 0.1 and abs(noisy[blur] - clean[blur]) < 0.05
    assert soft[blur] > clean[blur] + 0.1 and abs(soft[noise] - clean[noise]) < 0.05


def test_the_bootstrap_interval_tells_a_noised_set_from_a_clean_one(evaluator, reals):
    a, b, _ = reals
    clean = frechet_interval(evaluator, a, b, resamples=50)
    noisy = frechet_interval(evaluator, a, noised(b), resamples=50)
    assert clean[0] < clean[1] < noisy[0] < noisy[1]
    assert frechet_interval(evaluator, a, b, resamples=50) == clean  # seeded: the same interval every time
