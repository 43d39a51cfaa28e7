"""The runtime's bookkeeping on its own: steps, generations and CFG layouts, with a stand-in model."""

import types

import pytest
import torch

from ddit.policies import PatchPolicy
from ddit.runtime import Call, PatchRuntime


class Recorder(PatchPolicy):
    """Base size always; keeps each decision's step index and batch."""

    name = "recorder"

    def reset(self, batch_size, base_size, candidates):
        super().reset(batch_size, base_size, candidates)
        self.seen = []

    def choose(self, step):
        self.seen.append((step.index, step.num_steps, round(step.sigma, 3), len(step.latent)))
        return self.base_size, {}


def call(latent, t, **kwargs):
    return Call(latent, torch.tensor([t]), lambda idx, size: latent if idx is None else latent[idx], **kwargs)


def scheduler(step_index=None, begin_index=None, n=10):
    return types.SimpleNamespace(step_index=step_index, begin_index=begin_index, timesteps=torch.arange(n),
                                 sigmas=torch.linspace(1, 0, n + 1))


def test_steps_follow_the_scheduler_index_even_when_timesteps_repeat():
    policy, sched = Recorder(), scheduler()
    runtime = PatchRuntime(policy, (2, 4), scheduler=lambda: sched)
    x = torch.zeros(1, 4, 8, 8)
    for index in range(3):
        sched.step_index = None if index == 0 else index
        runtime(call(x, 500.0))  # the same timestep at every step (e.g. a repeated Karras sigma)
        runtime(call(x, 500.0, branch="uncond"))
    assert [s[0] for s in policy.seen] == [0, 1, 2]


def test_an_img2img_start_is_read_from_the_begin_index():
    policy, sched = Recorder(), scheduler(begin_index=6)
    runtime = PatchRuntime(policy, (2, 4), scheduler=lambda: sched)
    runtime(call(torch.zeros(1, 4, 8, 8), 400.0))
    assert policy.seen == [(6, 10, 0.4, 1)]


def test_without_an_index_a_new_timestep_is_a_step_and_a_higher_one_a_new_generation():
    policy = Recorder()
    runtime = PatchRuntime(policy, (2, 4))
    x = torch.randn(2, 4, 8, 8)
    for t in (900.0, 600.0, 300.0, 900.0):
        runtime(call(x, t))
    assert [s[0] for s in policy.seen] == [0]  # the last call started over: a new trace
    assert len(runtime.records) == 2  # its records only, one per sample


def test_without_an_index_a_branch_that_calls_again_at_the_same_timestep_starts_a_step():
    """SkyReels-V2's diffusion forcing steps copies of its scheduler (no index) and gives integer timesteps,
    which repeat where a long schedule's steps lie closer than 1 apart: its cond call coming again is the next
    step, not a third call of this one."""
    policy = Recorder()
    runtime = PatchRuntime(policy, (2, 4))
    x = torch.randn(1, 4, 8, 8)
    for t in (999.0, 999.0, 998.0):
        runtime(call(x, t, branch="cond"))
        runtime(call(x, t, branch="uncond"))
    assert [s[0] for s in policy.seen] == [0, 1, 2]
    assert [(r["step"], r["branch"]) for r in runtime.records] == [
        (s, b) for s in range(3) for b in ("cond", "uncond")]


def test_identical_halves_are_two_cfg_branches_of_each_sample_unless_told_otherwise():
    x = torch.randn(2, 4, 8, 8)
    doubled = torch.cat([x, x])
    policy = Recorder()
    PatchRuntime(policy, (2, 4))(call(doubled, 900.0))
    assert policy.seen[0][3] == 2
    policy = Recorder()
    PatchRuntime(policy, (2, 4))(call(doubled, 900.0, branches=1))  # e.g. pipe.do_classifier_free_guidance False
    assert policy.seen[0][3] == 4


def test_two_branches_said_but_halves_that_differ_are_samples():
    """The guidance a pipeline reports can be stale (a pipeline made from the enabled one by from_pipe, called
    without guidance, while the first last guided): batched CFG rows hold one latent twice, so rows whose halves
    differ are samples."""
    policy = Recorder()
    PatchRuntime(policy, (2, 4))(call(torch.randn(2, 4, 8, 8), 900.0, branches=2))
    assert policy.seen[0][3] == 2
    policy = Recorder()
    PatchRuntime(policy, (2, 4))(call(torch.randn(1, 4, 8, 8), 900.0, branches=2))  # was: cannot split
    assert policy.seen[0][3] == 1


def test_an_extra_call_with_one_branch_at_the_same_step_is_accepted():
    """SD3's skip-layer guidance: after the batched CFG call, one more with the cond rows only."""
    x = torch.randn(2, 4, 8, 8)
    runtime = PatchRuntime(Recorder(), (2, 4))
    runtime(call(torch.cat([x, x]), 900.0))
    out = runtime(call(x, 900.0))
    assert torch.equal(out, x) and [r["tokens"] for r in runtime.records] == [32, 32, 16, 16]


def test_a_steps_later_calls_without_a_branch_name_are_named_by_their_order():
    """Chroma calls once per CFG branch with no cache context: its uncond call must not share the cond call's
    cache state or diffusers cache context, nor a batched pipeline's extra call (SD3's skip-layer guidance)."""
    policy, sched = Recorder(), scheduler()
    runtime = PatchRuntime(policy, (2, 4), scheduler=lambda: sched)
    x = torch.randn(2, 4, 8, 8)
    for index in range(2):
        sched.step_index = index
        runtime(call(x, 900.0 - index, branches=1))
        runtime(call(x, 900.0 - index, branches=1))
    order = [(r["step"], r["branch"]) for r in runtime.records if r["sample"] == 0]
    assert order == [(0, None), (0, "call2"), (1, None), (1, "call2")]
    assert len(policy.seen) == 2  # one decision per step, which the later call follows


def test_a_new_schedule_starts_a_new_generation_at_the_same_step_and_timestep():
    """A pipeline call that died after its first step's transformer call leaves the runtime at step 0, t = 1000;
    its retry starts there too, but with new timesteps from set_timesteps."""
    policy, sched = Recorder(), scheduler()
    runtime = PatchRuntime(policy, (2, 4), scheduler=lambda: sched)
    runtime(call(torch.zeros(2, 4, 8, 8), 1000.0))
    sched.timesteps = torch.arange(10)  # set_timesteps of the next pipeline call
    runtime(call(torch.zeros(1, 4, 8, 8), 1000.0))  # another batch: a continuation would refuse it
    assert policy.seen == [(0, 10, 1.0, 1)] and runtime.records[0]["sample"] == 0 and len(runtime.records) == 1


def test_a_call_that_raises_ends_its_generation():
    policy, sched = Recorder(), scheduler()
    runtime = PatchRuntime(policy, (2, 4), scheduler=lambda: sched)

    def dies(idx, size):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        runtime(Call(torch.zeros(2, 4, 8, 8), torch.tensor([1000.0]), dies))
    assert runtime.generation is None
    runtime(call(torch.zeros(1, 4, 8, 8), 1000.0))
    assert policy.seen == [(0, 10, 1.0, 1)]


def test_second_order_schedulers_are_refused():
    """Heun and KDPM2 call the transformer twice per step: the policy would read predictor and corrector latents
    as steps."""
    sched = scheduler()
    sched.order = 2
    runtime = PatchRuntime(Recorder(), (2, 4), scheduler=lambda: sched)
    with pytest.raises(ValueError, match="twice per step .* first-order scheduler"):
        runtime(call(torch.zeros(1, 4, 8, 8), 1000.0))


def test_the_summary_marks_a_skip_of_one_cfg_branch_apart_from_a_skip_of_the_whole_sample():
    from ddit.summary import Summary

    def record(sample, branch, cached):
        return dict(step=0, sigma=1.0, sample=sample, branch=branch, patch_size=2, tokens=4, base_tokens=4,
                    cached=cached, seconds=None, signals={})

    records = [record(0, "cond", True), record(0, "uncond", True), record(1, "cond", False), record(1, "uncond", True),
               record(2, "cond", False), record(2, "uncond", False)]
    row = str(Summary(records, base_size=2)).splitlines()
    assert any(line.rstrip(" │|").endswith("x ~ .") for line in row)  # sample 0 both, 1 one branch, 2 none
