"""A bf16 pipeline's policy reads float32 latents: its scheduler's twin steps them with the same model outputs."""

import torch
import pytest
from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tiny_pipelines import build, latents

import ddit
from ddit.policies import FixedPolicy, get_policy
from ddit.precise_latents import PreciseLatents

STEPS = 12


def velocity(z: torch.Tensor, i: int) -> torch.Tensor:
    """A smooth flow a model might predict, computed in float32 and returned in bf16 as a bf16 model would."""
    return (torch.sin(z.float() * 0.5 + 0.1 * i) - z.float()).to(torch.bfloat16)


def loop(scheduler, z: torch.Tensor) -> list[torch.Tensor]:
    scheduler.set_timesteps(STEPS)
    seen = [z]
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(velocity(z, i), t, z, return_dict=False)[0]
        seen.append(z)
    return seen


def test_the_twin_integrates_the_pipelines_own_outputs_in_float32_and_leaves_its_latents_alone():
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for scheduler_class in (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler):
        stock = loop(scheduler_class(), z0)
        scheduler, precise = scheduler_class(), PreciseLatents()
        precise.watch(scheduler)
        scheduler.set_timesteps(STEPS)
        z, twins, outputs = z0, [], []
        for i, t in enumerate(scheduler.timesteps):
            v = velocity(z, i)
            outputs.append(v)
            z = scheduler.step(v, t, z, return_dict=False)[0]
            twins.append(precise.latent_for(torch.cat([z, z])))  # a batched CFG call holds it twice
            assert torch.equal(z, stock[i + 1])  # the pipeline's trajectory is the stock one
        reference, state = scheduler_class(), z0.float()  # the same outputs, stepped in float32 throughout
        reference.set_timesteps(STEPS)
        for i, t in enumerate(reference.timesteps):
            state = reference.step(outputs[i].float(), t, state, return_dict=False)[0]
            torch.testing.assert_close(twins[i], torch.cat([state, state]), rtol=0, atol=0)
        assert twins[-1].dtype == torch.float32 and not torch.equal(twins[-1][:2], stock[-1].float())
        precise.unwatch()
        assert "step" not in vars(scheduler)


def test_the_twin_replaces_the_latent_where_a_call_holds_it_first_or_last_among_its_tokens():
    """Most pipelines pass the latent first (Flux's edits append reference tokens); Qwen-Image 2.1 appends it after
    its condition images' tokens."""
    scheduler, precise = FlowMatchEulerDiscreteScheduler(), PreciseLatents()
    precise.watch(scheduler)
    scheduler.set_timesteps(STEPS)
    z = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    z = scheduler.step(velocity(z, 0), scheduler.timesteps[0], z, return_dict=False)[0]
    twin, condition = precise._latent, torch.zeros(2, 6, 4, dtype=torch.bfloat16)
    torch.testing.assert_close(precise.latent_for(torch.cat([z, condition], 1)), torch.cat([twin, condition], 1))
    torch.testing.assert_close(precise.latent_for(torch.cat([condition, z], 1)), torch.cat([condition, twin], 1))
    assert not torch.equal(twin, z.float()) and precise.latent_for(torch.cat([condition, z + 1], 1)) is None


def test_third_differences_of_the_twin_are_not_rounding_noise():
    """The policies' signal on a smooth flow: bf16 latents bury it under rounding, the twin's keep it."""
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scheduler, precise = FlowMatchEulerDiscreteScheduler(), PreciseLatents()
    precise.watch(scheduler)
    rounded = loop(scheduler, z0)
    twin = [z0.float()]
    scheduler.set_timesteps(STEPS)
    z = z0
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(velocity(z, i), t, z, return_dict=False)[0]
        twin.append(precise.latent_for(z))
    exact, state = [z0.float()], z0.float()
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(STEPS)
    for i, t in enumerate(reference.timesteps):
        state = reference.step(velocity(state, i).float(), t, state, return_dict=False)[0]
        exact.append(state)

    def third(zs):
        return torch.stack([(zs[i] - 3 * zs[i - 1] + 3 * zs[i - 2] - zs[i - 3]).float().abs().mean()
                            for i in range(3, 8)])

    error_rounded = (third(rounded) - third(exact)).abs().max()
    error_twin = (third(twin) - third(exact)).abs().max()
    assert error_twin < error_rounded / 5, (error_twin, error_rounded)


def test_a_bf16_pipelines_policy_reads_float32_latents_and_its_images_stay_stock():
    class Seen(FixedPolicy):
        def choose(self, step):
            self.latents.append(step.latent)
            return super().choose(step)

    pipe, kwargs = build("flux")
    pipe.to(dtype=torch.bfloat16)

    def call():  # fresh generators each time
        given = kwargs(batch=1, steps=6)
        return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in given.items()}

    stock = latents(pipe(**call()))
    policy = Seen([2] * 6)
    policy.latents = []
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=policy)
    assert torch.equal(latents(pipe(**call())), stock)  # the base size every step: the stock output exactly
    assert policy.latents[0].dtype == torch.bfloat16  # before the first step: the pipeline's own noise
    assert all(z.dtype == torch.float32 for z in policy.latents[1:])
    ddit.disable(pipe)
    assert "step" not in vars(pipe.scheduler)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=get_policy("third_order"))
    first, second = latents(pipe(**call())), latents(pipe(**call()))
    assert torch.equal(first, second)  # a second generation starts a twin of its own
    ddit.disable(pipe)


def test_a_scheduler_that_draws_noise_is_not_followed_and_says_so():
    scheduler, precise = EulerAncestralDiscreteScheduler(), PreciseLatents()
    precise.watch(scheduler)
    scheduler.set_timesteps(4)
    z = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="EulerAncestralDiscreteScheduler may draw noise"):
        z = scheduler.step(torch.zeros_like(z), scheduler.timesteps[0], z, return_dict=False)[0]
    assert precise.latent_for(z) is None  # the policy reads the pipeline's own latents
