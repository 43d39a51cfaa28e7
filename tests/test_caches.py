"""Feature caches in the sampler: known answers, per-sample state, resets on patch-size change."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIT

from ddit import plugins
from ddit.adapter import MultiPatchTransformer
from ddit.caches import (
    Cache, Group, TaylorSeer, TeaCache, available_caches, delta_for_share, get_cache, load_teacache_fit,
    skipped_share, write_teacache_fit,
)
from ddit.caches.teacache import least_step, skipped_steps
from ddit.policies import FixedPolicy, PatchPolicy
from ddit.sampling import sample
from ddit.testbed.base_model import build_base_model, generate
from ddit.testbed.teacache import calibrate_teacache

LABELS = torch.tensor([0, 1, 2, 3])
IDENTITY = [0, 0, 0, 1, 0]  # TeaCache rescaling that keeps the measured change


def tea(delta):
    return TeaCache(delta=delta, coefficients=IDENTITY)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    base = build_base_model(**{**TINY_DIT, "num_layers": 2})  # two blocks: the second must step aside
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return MultiPatchTransformer(base.eval())


def cached(out):
    return ["".join("x" if r["cached"] else "." for r in trace) for trace in out.traces]


@pytest.mark.parametrize("cache", [tea(0.0), TaylorSeer(interval=1)], ids=["teacache-0", "taylorseer-1"])
def test_a_cache_that_never_skips_changes_nothing(model, cache):
    policy = [8, 8, 4, 2, 2]
    plain = generate(model, LABELS, steps=5, policy=FixedPolicy(policy))
    out = generate(model, LABELS, steps=5, policy=FixedPolicy(policy), cache=cache)
    assert torch.equal(plain.images, out.images)
    assert cached(out) == ["....."] * 4


def test_teacache_skips_but_never_the_first_and_last_steps(model):
    plain = generate(model, LABELS[:2], steps=6)
    out = generate(model, LABELS[:2], steps=6, cache=tea(1e9))
    assert cached(out) == [".xxxx."] * 2
    full, skipped = out.traces[0][0]["flops"], out.traces[0][1]["flops"]
    assert full == plain.traces[0][0]["flops"] and 0 < skipped < full / 10
    assert not torch.equal(plain.images, out.images) and torch.isfinite(out.images).all()


def test_taylorseer_computes_every_interval_after_its_warmup(model):
    out = generate(model, LABELS[:1], steps=9, cache=TaylorSeer(interval=3, order=1))
    assert cached(out) == ["..xx.xx.x"]


def test_caches_start_over_when_the_patch_size_changes(model):
    schedule = FixedPolicy([8, 8, 8, 2, 2, 2, 2])
    assert cached(generate(model, LABELS[:2], steps=7, policy=schedule, cache=tea(1e9))) == [".xx.xx."] * 2
    schedule = FixedPolicy([8, 8, 8, 8, 2, 2, 2])
    out = generate(model, LABELS[:2], steps=7, policy=schedule, cache=TaylorSeer(interval=4, order=1))
    assert cached(out) == ["..xx..x"] * 2


class FirstStepCoarse(PatchPolicy):
    """Samples 0 and 2 start at size 4, then everyone runs at the base size: their caches start later."""

    name = "first_step_coarse"

    def choose(self, step):
        return torch.tensor([4, 2, 4, 2]) if step.index == 0 else 2, {}


def test_a_sample_does_not_depend_on_its_group_with_a_cache(model):
    cache = TaylorSeer(interval=3, order=1)
    together = generate(model, LABELS, steps=6, policy=FirstStepCoarse(), cache=cache)
    assert cached(together) == ["...xx.", "..xx.x"] * 2  # mixed groups: some rows skip, others compute
    for i in range(4):
        alone = generate(model, LABELS[i : i + 1], steps=6, seed=i, policy=FixedPolicy([[4, 2][i % 2]] + [2] * 5),
                         cache=cache)
        assert cached(alone) == cached(together)[i : i + 1]
        assert torch.allclose(alone.images[0], together.images[i], atol=1e-5)


def test_teacache_rule_on_a_recorded_trajectory_and_the_least_delta_for_a_share():
    """With the identity fit the rescaled change is the change: 0.1 a step accumulates to 0.3, past 0.25, at the
    third step that may skip. Above delta 0.2 half the steps skip; the most any delta skips is all but the first
    and last."""
    identity, changes = [0, 0, 0, 1, 0], [0.1] * 5  # six steps
    assert skipped_steps(identity, 0.25, changes) == [False, True, True, False, True, False]
    assert skipped_steps(identity, 0.0, changes) == [False] * 6  # delta 0 never skips
    # 0.1 skips; 0.1 + 0.3 computes and starts again; 0.05 and 0.1 skip; the last step computes
    assert skipped_steps(identity, 0.25, [0.1, 0.3, 0.05, 0.05, 0.2]) == [False, True, False, True, True, False]
    assert skipped_share(identity, 0.25, [changes, changes[:2]]) == pytest.approx((3 + 1) / (6 + 3))
    # half the steps skip from just above 0.2 up to 0.4 (above it, a fourth): the middle of that range
    assert skipped_share(identity, 0.2, [changes]) < 0.5 <= skipped_share(identity, 0.2 + 1e-9, [changes])
    assert delta_for_share(identity, [changes], 0.5) == pytest.approx(0.3)
    assert delta_for_share(identity, [changes], 0.6) == pytest.approx(0.6)  # the most: from 0.4, told as 0.4 x 1.5
    assert delta_for_share(identity, [changes], 0.7) is None  # 4 of 6 at most
    assert delta_for_share(identity, [changes + [float("nan")]], 0.5) is not None  # a bad change drops out


def test_taylorseer_extrapolates_a_linear_residual_exactly():
    cache = TaylorSeer(interval=4, order=1)
    state, hidden = {}, torch.zeros(3)
    for step in (0, 2):  # full steps two apart: residual = 1 + 0.5 step
        cache.record(state, Group(step, 10, (0,), 2), hidden, torch.full((3,), 1 + 0.5 * step))
    assert torch.allclose(cache.predict(state, Group(5, 10, (0,), 2), hidden + 1), torch.full((3,), 1 + 3.5))


def test_calibration_fits_a_quartic_that_the_loader_reads_back(model, tmp_path):
    coefficients = calibrate_teacache(model.backbone, per_class=1, steps=4)
    assert len(coefficients) == 5 and all(map(math.isfinite, coefficients))
    write_teacache_fit(coefficients, tmp_path / "fit.json", steps=4)
    assert load_teacache_fit(tmp_path / "fit.json") == coefficients
    with pytest.raises(FileNotFoundError, match="fit_teacache"):
        load_teacache_fit(tmp_path / "missing.json")


def test_registry_and_its_errors(model, monkeypatch):
    class PluginCache(TeaCache):
        name = "from_a_plugin"

    monkeypatch.setattr(plugins, "collect", lambda hook: [PluginCache] if hook == "ddit_caches" else [])
    assert set(available_caches()) == {"teacache", "taylorseer", "from_a_plugin"}
    assert get_cache("none") is None
    assert get_cache("taylorseer", interval=2, order=0).interval == 2
    assert isinstance(get_cache("teacache", coefficients=IDENTITY), Cache)
    with pytest.raises(ValueError, match="unknown feature cache 'nope'; available: none, from_a_plugin, taylorseer, "
                                         "teacache"):
        get_cache("nope")
    with pytest.raises(ValueError, match="interval >= 1"):
        TaylorSeer(interval=0)
    with pytest.raises(ValueError, match="transformer_velocity"):
        sample(lambda x, t, labels, p: x, LABELS, sample_shape=(3, 8, 8), steps=2, cache=tea(0.1))


def test_docs_examples_run():
    docs = (Path(__file__).parents[1] / "docs" / "caches.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", docs, flags=re.S):
        exec(block, namespace)


def test_published_fits_come_with_their_delta_which_can_skip():
    for name, delta in (("flux1-dev", 0.4), ("ltx-video-0.9.1", 0.05)):
        cache = TeaCache(coefficients=name)
        assert cache.delta == delta and len(cache.coefficients) == 5 and least_step(cache.coefficients) < delta
    with pytest.raises(ValueError, match="neither a published fit .*flux1-dev, ltx-video-0.9.1"):
        TeaCache(coefficients="ltx-video")


def test_teacache_without_a_fit_for_the_model_refuses_before_sampling(model):
    with pytest.raises(ValueError, match="coefficients=.*ddit calibrate teacache --pipeline"):
        generate(model, LABELS[:1], steps=3, cache=TeaCache(delta=0.1))
