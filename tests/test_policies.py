"""Patch policies, driven from plain tensors with known answers."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ddit import plugins
from ddit.policies import (
    Decision, PatchPolicy, Step, available_policies, calibrate_tau, finite_difference, get_policy,
    patch_std, percentile, trace_rows,
)

BASE, CANDIDATES = 2, (2, 4, 8)


def run(policy, latents, probe=None, candidates=CANDIDATES):
    """Drive ``policy`` over latents stacked (steps, B, ...); returns sizes (steps, B)."""
    steps = len(latents)
    policy.reset(latents.shape[1], candidates[0], candidates)
    return torch.stack([
        policy.decide(Step(i, steps, 1 - i / steps, 1000 * (1 - i / steps), z, probe))
        for i, z in enumerate(latents)
    ])


def polynomial(coefficients, steps=8):
    """Latents z_i = sum_k c_k i^k, stacked (steps, *c_k.shape)."""
    i = torch.arange(steps, dtype=torch.float32).reshape(-1, *[1] * coefficients[0].dim())
    return sum(c * i**k for k, c in enumerate(coefficients))


def checkerboard(shape):
    """+-1 in a pattern that has zero mean and unit std over any even-sized patch."""
    c, h, w = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    return 1.0 - 2.0 * ((c + h + w) % 2)


# --- signal ------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [1, 2, 3])
def test_finite_difference_is_numpy_diff(order):
    latents = torch.randn(6, 2, 4, 8, 8, dtype=torch.float64)
    expected = np.diff(latents.numpy(), n=order, axis=0)
    np.testing.assert_allclose(finite_difference(latents, order).numpy(), expected)


def test_third_difference_of_cubic_is_constant_and_of_quadratic_zero():
    a, b, c, d = torch.randn(4, 3, dtype=torch.float64)
    cubic = polynomial([a, b, c, d], steps=7)
    torch.testing.assert_close(finite_difference(cubic, 3), (6 * d).expand(4, 3))
    torch.testing.assert_close(finite_difference(polynomial([a, b, c]), 3), torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs 4 latents"):
        finite_difference(cubic[:3], 3)


def test_patch_std_matches_a_loop_and_patches_video_per_frame():
    x = torch.randn(2, 3, 8, 12)
    expected = torch.stack([
        torch.stack([x[b, :, i:i + 4, j:j + 4].std(correction=0) for i in range(0, 8, 4) for j in range(0, 12, 4)])
        for b in range(2)
    ])
    torch.testing.assert_close(patch_std(x, 4), expected)
    video = torch.randn(2, 3, 5, 8, 8)
    per_frame = torch.cat([patch_std(video[:, :, f], 2) for f in range(5)], dim=1)
    torch.testing.assert_close(patch_std(video, 2), per_frame)
    with pytest.raises(ValueError, match="divisible"):
        patch_std(x, 8)


@pytest.mark.parametrize("rho", [0, 10, 50, 90, 99, 100])
def test_percentile_is_numpy_nearest_rank(rho):
    values = torch.rand(3, 37)
    expected = np.percentile(values.numpy(), rho, axis=-1, method="inverted_cdf")
    np.testing.assert_allclose(percentile(values, rho).numpy(), expected)


# --- the paper's rule --------------------------------------------------------------------------

def test_quadratic_trajectory_goes_coarse_on_third_order_not_first():
    latents = polynomial([torch.randn(1, 4, 16, 16) for _ in range(3)])
    third = run(get_policy("third_order", tau=1e-3), latents)
    first = run(get_policy("first_order", tau=1e-3), latents)
    assert third[:3].eq(BASE).all() and third[3:].eq(8).all()  # base during the 3-step warm-up
    assert first.eq(BASE).all()


def test_local_detail_keeps_percentile_fine_while_mean_goes_coarse():
    """A cubic (detailed) change in one 4x4 region on a quadratic (smooth) background."""
    detail = torch.zeros(1, 4, 16, 16)
    detail[..., :4, :4] = checkerboard((4, 4, 4))  # third difference there: +-6
    latents = polynomial([torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), 0.1 * torch.randn(1, 4, 16, 16), detail])
    # per-patch std of the third difference: 6 in the region's patches; at p=8 the region is a
    # quarter of one patch: std 3, mean over the four patches 0.75
    percentile_sizes = run(get_policy("third_order", tau=2.0, rho=95), latents)
    mean_sizes = run(get_policy("mean", tau=2.0), latents)
    assert percentile_sizes.eq(BASE).all()
    assert mean_sizes[3:].eq(8).all()


def test_per_size_tau_gates_each_size_on_its_own_threshold():
    """On a white-noise-like third difference the per-patch std is the same at 4 and 8, so one
    tau takes 8 whenever it takes 4; a per-size tau keeps 8 for smaller signals."""
    latents = polynomial([torch.randn(1, 4, 16, 16) for _ in range(3)] + [1e-3 * torch.randn(1, 4, 16, 16)])
    signal = run(get_policy("third_order", tau=1.0), latents)  # record the signals once
    assert signal[3:].eq(8).all()
    assert run(get_policy("third_order", tau={4: 1.0, 8: 1e-9}), latents)[3:].eq(4).all()
    assert run(get_policy("third_order", tau={4: 1.0}), latents)[3:].eq(4).all()  # absent: never 8
    assert run(get_policy("third_order", tau={4: 1e-9, 8: 1.0}), latents)[3:].eq(8).all()


def test_restart_holds_a_new_size_until_its_own_history_is_full():
    """After a switch the next three third differences span both sizes; with restarts they
    are not acted on, and the size stays until four latents of it are in the history."""
    small, big = torch.full((3, 1), 0.1), torch.full((3, 1), 10.0)
    signals = [None, None, None, small, big, big, big, small, small, small]
    schedules = {}
    for restart in (True, False):
        rule = get_policy("third_order", tau=1.0, restart=restart)
        rule.reset(1, BASE, CANDIDATES)
        schedules[restart] = [int(rule.schedule(s)) for s in signals]
    assert schedules[True] == [2, 2, 2, 8, 8, 8, 2, 2, 2, 8]
    assert schedules[False] == [2, 2, 2, 8, 2, 2, 2, 8, 8, 8]


def test_fine_tail_keeps_the_last_steps_at_the_base_size():
    """fine_tail=0.2 of 10 steps: the last 2 at the base size, whatever the signal; restarts
    hold no coarse size into the tail. Calibration replays the tail too."""
    latents = polynomial([torch.randn(1, 4, 16, 16) for _ in range(3)], steps=10)
    assert run(get_policy("third_order", tau=1e-3, fine_tail=0.0), latents)[:, 0].tolist() == [2, 2, 2] + [8] * 7
    assert run(get_policy("third_order", tau=1e-3, fine_tail=0.2), latents)[:, 0].tolist() == [2, 2, 2] + [8] * 5 + [2, 2]
    assert run(get_policy("mean", tau=1e-3, fine_tail=0.5), latents)[5:].eq(BASE).all()
    trace = synthetic_trace([1.0] * 10)  # size 4's signal 1 at every step, size 8's 1e9
    plain, tail = get_policy("third_order", restart=False), get_policy("third_order", restart=False, fine_tail=0.2)
    assert 1 < calibrate_tau([trace], 0.3, rule=plain) < 1.001  # all 10 steps at 4: 0.25
    assert calibrate_tau([trace], 0.3, rule=tail) > 1e9  # 8 at 4 and 2 at 2 cost 0.4: size 8 needed
    with pytest.raises(ValueError, match="out of reach"):  # 2 of 10 steps are never coarse: >= 0.25
        calibrate_tau([trace], 0.2, rule=tail)
    unknown = synthetic_trace([1.0] * 10, num_steps=0)  # no step count: no tail at run time, nor here
    assert 1 < calibrate_tau([unknown], 0.3, rule=tail) < 1.001


def test_decisions_differ_per_sample_within_a_batch():
    smooth = polynomial([torch.randn(4, 16, 16) for _ in range(3)])
    detailed = polynomial([torch.randn(4, 16, 16) for _ in range(4)])
    latents = torch.stack([smooth, detailed], dim=1)
    sizes = run(get_policy("third_order", tau=1e-2), latents)
    assert sizes[3:].tolist() == [[8, BASE]] * 5


def test_trace_records_signals_and_turns_into_rows():
    latents = torch.randn(6, 2, 4, 8, 8)
    policy = get_policy("third_order", tau=1e-2, rho=75)
    sizes = run(policy, latents)
    assert [d.index for d in policy.trace] == list(range(6))
    assert all(not d.signals for d in policy.trace[:3])
    delta = finite_difference(latents[-4:], 3)[-1]
    for p in CANDIDATES:
        torch.testing.assert_close(policy.trace[-1].signals[p], percentile(patch_std(delta, p), 75))
    rows = trace_rows(policy.trace)
    assert len(rows) == 6 * 2
    assert rows[-1] == {
        "step": 5, "sigma": pytest.approx(1 / 6), "sample": 1, "patch_size": int(sizes[-1, 1]),
        **{f"signal_{p}": pytest.approx(float(policy.trace[-1].signals[p][1])) for p in CANDIDATES},
    }


def test_reset_clears_history_and_trace():
    policy = get_policy("third_order", tau=1e3)
    run(policy, torch.randn(5, 1, 4, 8, 8))
    assert policy.decide(Step(5, 8, 0.3, 300, torch.randn(1, 4, 8, 8))).item() == 8
    sizes = run(policy, torch.randn(3, 1, 4, 8, 8))  # no history survives: still warming up
    assert sizes.eq(BASE).all() and len(policy.trace) == 3


def test_video_latents():
    latents = polynomial([torch.randn(2, 4, 3, 8, 8) for _ in range(3)], steps=5)
    assert run(get_policy("third_order", tau=1e-3), latents)[3:].eq(8).all()


# --- other built-ins -------------------------------------------------------------------------

def test_fixed_and_baseline():
    latents = torch.randn(4, 2, 4, 8, 8)
    assert run(get_policy("fixed", schedule=[8, 4, 4, 2]), latents)[:, 0].tolist() == [8, 4, 4, 2]
    assert run(get_policy("fixed", fraction=0.5), latents)[:, 1].tolist() == [8, 8, 2, 2]
    assert run(get_policy("fixed", fraction=0.25, size=4), latents)[:, 1].tolist() == [4, 2, 2, 2]
    assert run(get_policy("baseline"), latents).eq(BASE).all()


def test_coarse_to_fine_turns_fine_for_good_at_the_first_signal_above_tau():
    """Sample 0's third difference is zero until step 6 (a quadratic), then jumps (a cubic term
    switched on); sample 1's never moves. Coarse (2p) through the warm-up and while the 2p signal
    stays below tau, the base size from the first step it reaches tau, even when it falls again."""
    steps = 10
    i = torch.arange(steps, dtype=torch.float32)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kick = torch.where(i == 6, 1.0, 0.0).cumsum(0).cumsum(0).cumsum(0)  # third difference: 1 at step 6 only
    latents = torch.stack([(0.1 * i + 0.01 * i**2 + kick)[:, None, None, None] * noise,
                           (0.1 * i)[:, None, None, None] * noise], dim=1).squeeze(2)
    sizes = run(get_policy("coarse_to_fine", tau=1e-3), latents)
    assert sizes[:, 0].tolist() == [4] * 6 + [2] * 4  # its signal falls back to 0 after step 6: stays fine
    assert sizes[:, 1].tolist() == [4] * steps
    tail = run(get_policy("coarse_to_fine", tau=1e-3, fine_tail=0.2), latents)
    assert tail[:, 1].tolist() == [4] * 8 + [2] * 2


def test_probed_third_order_reads_only_base_made_latents():
    """Sample 0's third difference is zero but for one spike at step 6, inside its first coarse hold;
    sample 1's is large throughout; sample 2 spikes at step 10, the step its first probe decides.
    With hold 4: coarse (the coarsest size below tau) for steps 3-6 whatever the signal, then three
    base-size steps (the probe), then the rule again. ``third_order`` instead reads sample 0's spike
    off the coarse steps and goes back to the base size at step 6."""
    steps = 20
    i = torch.arange(steps, dtype=torch.float32)
    noise = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))

    def spike(at):  # a cubic piece whose third difference is 1 at step ``at`` only
        return torch.where(i == at, 1.0, 0.0).cumsum(0).cumsum(0).cumsum(0)

    paths = [0.1 * i + spike(6), i**3, 0.1 * i + spike(10)]
    latents = torch.stack([path[:, None, None, None] * noise for path in paths], dim=1)
    sizes = run(get_policy("probed_third_order", tau=1e-3, hold=4), latents)
    cycle = [8] * 4 + [2] * 3
    assert sizes[:, 0].tolist() == [2] * 3 + cycle * 2 + [8] * 3
    assert sizes[:, 1].tolist() == [2] * steps
    assert sizes[:, 2].tolist() == [2] * 3 + [8] * 4 + [2] * 4 + cycle + [8] * 2  # the probe saw the spike: one more
    assert run(get_policy("third_order", tau=1e-3), latents)[:6 + 1, 0].tolist() == [2, 2, 2, 8, 8, 8, 2]
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="hold"):
            get_policy("probed_third_order", hold=bad)


def test_oracle_takes_the_largest_size_within_tolerance():
    def probe(p, z):  # a model that sees z averaged over p x p patches
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, p), scale_factor=p)

    blocky = torch.randn(2, 4, 4, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # constant on 4x4
    blocky[1, :, 0, 0] += 10  # sample 1 has one fine detail
    policy = get_policy("oracle", tolerance=0.01)
    assert run(policy, blocky[None], probe=probe).tolist() == [[4, BASE]]
    assert policy.trace[0].signals[4][0] < 1e-6 and policy.trace[0].signals[8][0] > 0.01
    with pytest.raises(ValueError, match="needs step.probe"):
        run(policy, blocky[None])


def test_oracle_at_a_budget_fits_its_tolerance_to_the_cost():
    """Errors at size 4 of 1..10 over ten steps, size 8 never affordable: k steps at size 4 cost
    (10 - k + k/4) / 10, so a 0.7 budget needs k = 4, a tolerance just above the 4th error."""
    trace = [Decision(i, 1 - i / 10, torch.tensor([2]),
                      {2: torch.zeros(1), 4: torch.tensor([float(i + 1)]), 8: torch.tensor([1e9])}) for i in range(10)]
    policy = get_policy("oracle_budget", fraction=0.7)
    assert policy.tolerance == 0  # uncalibrated: the base schedule, recording errors
    assert 4 < policy.calibrate([trace]) < 4.001
    assert policy.tau == policy.tolerance  # the name the harness sets a calibration by
    assert 6 < get_policy("oracle_budget", speedup=1 / 0.55, traces=[trace]).tolerance < 6.001
    with pytest.raises(ValueError, match="out of reach"):
        get_policy("oracle_budget", fraction=0.05, traces=[trace])
    with pytest.raises(ValueError, match="exactly one"):
        get_policy("oracle_budget")


# --- budget ---------------------------------------------------------------------------------

def synthetic_trace(signal_4, steps=10, warmup=0, num_steps=None):
    """One sample; the size-4 signal at step i is signal_4[i]; size 8 only below a huge tau."""
    return [
        Decision(i, 1 - i / steps, torch.tensor([2]),
                 {} if i < warmup else {2: torch.zeros(1), 4: torch.tensor([signal_4[i]]), 8: torch.tensor([1e9])},
                 steps if num_steps is None else num_steps)
        for i in range(steps)
    ]


def test_calibrate_tau_known_answer():
    """On Eq. 5 as written (``restart=False``), where each step decides on its own."""
    plain = get_policy("third_order", restart=False)
    trace = synthetic_trace([float(i + 1) for i in range(10)])  # values 1..10, each step 1 or 1/4
    # k coarse steps cost (10 - k + k/4) / 10 <= 0.7  <=>  k >= 4: tau just above the 4th value
    tau = calibrate_tau([trace], 0.7, rule=plain)
    assert 4 < tau < 4.001
    assert 6 < calibrate_tau([trace], 0.55, rule=plain) < 6.001  # k >= 6
    # warm-up steps count at the base size: 2 of 10 never go coarse
    assert calibrate_tau([synthetic_trace([float(i + 1) for i in range(10)], warmup=2)], 0.7, rule=plain) > 6
    # costs measured in seconds: size 4 takes half the time of size 2
    assert 6 < calibrate_tau([trace], 0.7, cost_per_size={2: 2.0, 4: 1.0, 8: 0.5}, rule=plain) < 6.001
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_tau([trace], 0.05, rule=plain)  # even all at size 8 costs 1/16


def test_calibrate_tau_replays_the_restart_rule():
    """Descending signals 10..1: below tau from step 10 - v on. With restarts the first three
    steps cannot switch (no settled history), so the schedule differs from Eq. 5 alone."""
    trace = synthetic_trace([float(10 - i) for i in range(10)])
    # plain: coarse at every step with signal < tau; 4 coarse steps (signals 4..1) cost 0.7
    assert 4 < calibrate_tau([trace], 0.7, rule=get_policy("third_order", restart=False)) < 4.001
    # restart: also 4 coarse steps (6..9) at tau just above 4; the first three steps would never switch
    assert 4 < calibrate_tau([trace], 0.7) < 4.001
    # 0.4 takes 8 steps at size 4 without restarts (tau just above 8); with them at most 7
    # (3..9) cost 0.475, so only size 8 (signal 1e9) meets it
    assert 8 < calibrate_tau([trace], 0.4, rule=get_policy("third_order", restart=False)) < 8.001
    assert calibrate_tau([trace], 0.4) > 1e9


def test_calibrate_tau_places_the_fine_tail_in_the_whole_schedule():
    """An img2img trace holds steps 4..9 of 10: a 0.2 fine tail protects steps 8 and 9, not the last 20% of the
    six recorded steps counted from 0 (then only step 4 could go coarse, and 0.6 would be out of reach)."""
    trace = [Decision(i, 1 - i / 10, torch.tensor([2]),
                      {2: torch.zeros(1), 4: torch.tensor([float(i - 3)]), 8: torch.tensor([1e9])}, num_steps=10)
             for i in range(4, 10)]
    # 4 coarse steps (4..7, signals 1..4) cost (2 + 4 / 4) / 6 = 0.5 <= 0.6; 3 would cost 0.625
    assert 4 < calibrate_tau([trace], 0.6, rule=get_policy("third_order", restart=False, fine_tail=0.2)) < 4.001


def test_budget_policy_calibrates_then_meets_its_budget():
    latents = torch.randn(12, 3, 4, 8, 8).cumsum(0)
    policy = get_policy("budget", speedup=2)
    assert run(policy, latents).eq(BASE).all()  # uncalibrated: records at the base size
    tau = policy.calibrate([policy.trace])
    sizes = run(policy, latents)
    fraction = ((BASE / sizes) ** 2).mean().item()
    assert policy.tau == tau and 0.4 < fraction <= 0.5


# --- errors and the registry ----------------------------------------------------------------

@pytest.mark.parametrize("params, match", [
    (dict(tau=0), r"tau must be > 0"),
    (dict(tau=-1), r"tau must be > 0"),
    (dict(tau={4: -1e-3}), r"thresholds >= 0"),
    (dict(tau={}), r"thresholds >= 0"),
    (dict(rho=101), r"\[0, 100\]"),
    (dict(rho=-1), r"\[0, 100\]"),
    (dict(warmup=2), r"warmup must be >= 3"),
    (dict(fine_tail=1), r"fine_tail .* \[0, 1\)"),
    (dict(fine_tail=-0.1), r"fine_tail .* \[0, 1\)"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        get_policy("third_order", **params)


@pytest.mark.parametrize("base, candidates", [(2, (2, 8, 4)), (2, (2, 3)), (2, (4, 8)), (2, ()), (0, (0, 2))])
def test_bad_candidates(base, candidates):
    with pytest.raises(ValueError, match="ascending multiples"):
        get_policy("baseline").reset(1, base, candidates)


def test_bad_fixed_schedules():
    with pytest.raises(ValueError, match=r"sizes \[3\] that are not candidates"):
        run(get_policy("fixed", schedule=[2, 3, 2]), torch.randn(3, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="has 2 sizes but the sampler runs 3 steps"):
        run(get_policy("fixed", schedule=[2, 4]), torch.randn(3, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="not both or neither"):
        get_policy("fixed")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_policy("fixed", fraction=1.5)


def test_budget_needs_a_reachable_budget():
    with pytest.raises(ValueError, match="exactly one"):
        get_policy("budget")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        get_policy("budget", fraction=1.0)
    with pytest.raises(ValueError, match="speedup must be > 1"):
        get_policy("budget", speedup=0)


def test_decide_checks_its_contract():
    with pytest.raises(RuntimeError, match="call reset"):
        get_policy("baseline").decide(Step(0, 1, 1.0, 1000, torch.randn(1, 4, 8, 8)))

    class Broken(PatchPolicy):
        name = "broken"

        def choose(self, step):
            return 3, {}

    with pytest.raises(RuntimeError, match=r"chose \[3\], not among \(2, 4, 8\)"):
        run(Broken(), torch.randn(1, 1, 4, 8, 8))


class PluginPolicy(PatchPolicy):
    name = "from_a_plugin"

    def choose(self, step):
        return self.base_size, {}


def test_registry_lists_builtins_and_plugins(monkeypatch):
    monkeypatch.setattr(plugins, "collect", lambda hook: [PluginPolicy] if hook == "ddit_policies" else [])
    names = set(available_policies())
    assert {"third_order", "second_order", "first_order", "mean", "fixed", "baseline", "oracle", "oracle_budget",
            "budget", "coarse_to_fine", "probed_third_order", "from_a_plugin"} <= names
    assert isinstance(get_policy("from_a_plugin"), PluginPolicy)
    policy = get_policy("third_order", tau=0.5, rho=80)
    assert (policy.tau, policy.rho) == (0.5, 80)
    with pytest.raises(ValueError, match=r"unknown patch policy 'nope'; available: .*from_a_plugin.*third_order"):
        get_policy("nope")


def test_plugins_cannot_shadow_builtins(monkeypatch):
    class Shadow(PluginPolicy):
        name = "third_order"

    monkeypatch.setattr(plugins, "collect", lambda hook: [Shadow, object])
    with pytest.warns(plugins.PluginWarning) as warned:
        policies = available_policies()
    assert policies["third_order"] is not Shadow and len(warned) == 2


def test_docs_examples_run():
    docs = (Path(__file__).parents[1] / "docs" / "policies.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", docs, flags=re.S):
        exec(block, namespace)
