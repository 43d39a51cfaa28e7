import pytest
import torch
from conftest import TINY_DIT

from ddit.sampling import sample, transformer_velocity
from ddit.testbed.base_model import NULL_LABEL, build_base_model

SHAPE = (3, 32, 32)


def test_euler_flow_lands_on_the_point_its_velocity_points_to():
    """For data concentrated at x0 the true velocity is (x_t - x0) / t; sampling must reach x0."""
    x0 = torch.linspace(-1, 1, 3 * 32 * 32).view(SHAPE)

    def exact_velocity(x, t, labels, patch_size):
        return (x - x0) / (t.view(-1, 1, 1, 1) / 1000)

    out = sample(exact_velocity, torch.zeros(2, dtype=torch.long), sample_shape=SHAPE, steps=20).images
    assert torch.allclose(out, x0.expand_as(out), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_fn():
    torch.manual_seed(0)
    model = build_base_model(**TINY_DIT)
    for p in model.parameters():  # non-zero output, unlike the adaLN-zero init
        torch.nn.init.normal_(p, std=0.05)
    return transformer_velocity(model.eval())


def test_same_seed_same_images(tiny_fn):
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = dict(sample_shape=SHAPE, steps=3, guidance=2.0, null_label=NULL_LABEL)
    a, b, c = (sample(tiny_fn, labels, seed=seed, **kwargs).images for seed in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_a_sample_does_not_depend_on_its_batch(tiny_fn):
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = dict(sample_shape=SHAPE, steps=3, guidance=2.0, null_label=NULL_LABEL)
    together = sample(tiny_fn, labels, seed=10, **kwargs).images
    one_by_one = sample(tiny_fn, labels, seed=10, batch_size=1, **kwargs).images
    alone = sample(tiny_fn, labels[2:3], seed=12, **kwargs).images  # sample 2 has seed 10 + 2
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert torch.allclose(together[2:3], alone, atol=1e-5)


def test_guidance_mixes_conditional_and_unconditional(tiny_fn):
    labels = torch.tensor([1, 3])
    kwargs = dict(sample_shape=SHAPE, steps=2, seed=0)
    plain = sample(tiny_fn, labels, **kwargs).images
    guided_once = sample(tiny_fn, labels, guidance=1.0, null_label=NULL_LABEL, **kwargs).images
    guided = sample(tiny_fn, labels, guidance=3.0, null_label=NULL_LABEL, **kwargs).images
    assert torch.equal(plain, guided_once)
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="null_label"):
        sample(tiny_fn, labels, guidance=3.0, **kwargs)


def test_traces_hold_one_record_per_sample_and_step(tiny_fn):
    out = sample(tiny_fn, torch.tensor([0, 1, 2]), sample_shape=SHAPE, steps=3, guidance=2.0, null_label=NULL_LABEL,
                 batch_size=2)
    assert [[r["step"] for r in trace] for trace in out.traces] == [[0, 1, 2]] * 3
    record = out.traces[2][1]
    assert record.keys() == {"step", "sigma", "patch_size", "seconds", "flops", "tokens", "cached", "signals"}
    assert record["patch_size"] == 2 and record["tokens"] == 2 * 16 * 16  # both CFG branches
    assert record["flops"] > 0 and record["seconds"] > 0 and not record["cached"] and record["signals"] == {}
    assert 1 > out.traces[0][1]["sigma"] > out.traces[0][2]["sigma"] > 0


def test_a_plain_model_runs_at_its_own_patch_size_only(tiny_fn):
    x, t, labels = torch.zeros(1, *SHAPE), torch.tensor([500.0]), torch.tensor([0])
    assert tiny_fn.patch_sizes == (2,)
    with pytest.raises(ValueError, match="MultiPatchTransformer"):
        tiny_fn(x, t, labels, 4)
