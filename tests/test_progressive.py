"""Spectral progressive resolution: the DCT resize, the sampler's half-resolution phase, and where it may run."""

import pytest
import torch

import ddit
from ddit.adapter import MultiPatchTransformer
from ddit.policies import ProgressiveResolution, dct_resize, get_policy
from ddit.testbed.base_model import build_base_model, generate
from tiny_pipelines import build

from conftest import TINY_DIT


def test_noise_keeps_its_variance_and_an_image_its_values():
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert dct_resize(noise, 16, keep="energy").std().item() == pytest.approx(1.0, abs=0.02)
    constant = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(dct_resize(constant, 16, keep="amplitude"), torch.full((1, 3, 16, 16), 0.7))
    torch.testing.assert_close(dct_resize(torch.full((1, 3, 16, 16), 0.7), 32, keep="amplitude"), constant)
    half = dct_resize(noise, 16, keep="amplitude")  # a band-limited image survives the round trip
    torch.testing.assert_close(dct_resize(dct_resize(half, 32, keep="amplitude"), 16, keep="amplitude"), half)
    with pytest.raises(ValueError, match="keep is 'energy' or 'amplitude'"):
        dct_resize(noise, 16, keep="both")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiPatchTransformer(build_base_model(**TINY_DIT)).eval()


def test_early_steps_run_at_half_resolution_on_a_quarter_of_the_tokens(model):
    labels = torch.tensor([0, 1])
    base = generate(model, labels, steps=6, guidance=2.0)
    late = generate(model, labels, steps=6, guidance=2.0, policy=get_policy("progressive", switch=1.0))
    torch.testing.assert_close(late.images, base.images)  # never above sigma 1: the baseline itself
    run = generate(model, labels, steps=6, guidance=2.0, policy=get_policy("progressive", switch=0.5))
    tokens = [step["tokens"] for step in run.traces[0]]
    half = [step["sigma"] > 0.5 for step in run.traces[0]]
    assert any(half) and not all(half)
    assert all(t * 4 == tokens[-1] for t, h in zip(tokens, half) if h)
    flops = [step["flops"] for step in run.traces[0]]
    assert all(f < flops[-1] / 3 for f, h in zip(flops, half) if h)
    assert run.images.shape == base.images.shape and not torch.allclose(run.images, base.images)


def test_a_switch_outside_the_noise_levels_is_refused():
    with pytest.raises(ValueError, match="switch is the noise level sigma"):
        ProgressiveResolution(switch=0)


def test_a_pipeline_refuses_it_before_anything_changes():
    pipe, _ = build("sd3")
    stock = pipe.transformer
    with pytest.raises(ValueError, match="progressive resolution changes the latent's size"):
        ddit.enable(pipe, MultiPatchTransformer(stock), policy="progressive")
    assert pipe.transformer is stock


@pytest.mark.parametrize("name", ["teacache", "taylorseer"])
def test_caches_start_afresh_when_the_resolution_changes(model, name):
    from ddit.caches import get_cache

    cache = get_cache(name, **({"coefficients": [0.0, 0.0, 0.0, 1.0, 0.0]} if name == "teacache" else {}))
    run = generate(model, torch.tensor([0, 1]), steps=8, guidance=2.0,
                   policy=get_policy("progressive", switch=0.5), cache=cache)
    assert torch.isfinite(run.images).all() and run.images.shape == (2, 3, 32, 32)


def test_the_ablation_has_a_progressive_reference_row_on_the_testbed_only():
    from ddit.ablate.config import build_config

    rows = build_config(["third_order"], ["none"], progressive=(0.4, 0.6)).rows
    assert [k for k in rows if k.startswith("progressive")] == ["progressive[switch=0.4]", "progressive[switch=0.6]"]
    assert rows["progressive[switch=0.4]"].make_policy().switch == 0.4
