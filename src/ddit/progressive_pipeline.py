"""Spectral progressive resolution inside a stock pipeline: ``ddit.progressive_call(pipe, switch, **call)``.

A pipeline's loop cannot change its latent's size, so the stock pipeline is called twice
on one noise schedule: first at half height and width, from the low frequencies of the
sample's own full-size noise, until sigma falls to ``switch``; then the latent is
upsampled by zero-padding its DCT spectrum and a second call finishes at full size. Both
calls run the sigmas the stock call would run at full size (its resolution-dependent shift
included: they are read from the pipeline itself, by letting it set its timesteps once), so
the early steps' latent size is the only change, and a switch above every step's sigma is
the stock call exactly (each call starts from the generators' and the global random state the stock call starts
from, so that what it draws besides its noise, a ControlNet pipeline's control latent, is the stock call's; after
the last, they are where the stock call leaves them).
Flow-matching pipelines whose call takes ``sigmas`` and ``latents`` (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image,
SD3, HunyuanImage 2.1, and the ControlNet pipelines of FLUX.1, SD3 and Qwen-Image); others are refused. The
text encoders run once per call (three times in all): negligible beside a large transformer's steps.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import (
    ChromaPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxControlNetPipeline,
    FluxPipeline,
    HunyuanImagePipeline,
    QwenImageControlNetPipeline,
    QwenImagePipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    ZImagePipeline,
)

from .pipeline_call import sized_by_image
from .policies import ProgressiveResolution, dct_resize


@dataclass(frozen=True)
class _Layout:
    """How a pipeline family holds its latent: its channels, and its packed form to and from an image grid."""

    channels: Callable  # pipe -> latent channels
    to_grid: Callable  # (pipe, latents as the pipeline returns them, height, width) -> (B, C, h, w)
    from_grid: Callable  # (pipe, grid) -> latents as the pipeline's call takes them


# FLUX.2 returns packed tokens but takes its latents as 2x2 patches on a grid (B, 4C, h/2, w/2)
_FLUX2 = _Layout(lambda pipe: pipe.transformer.config.in_channels // 4,
                 lambda pipe, x, h, w: pipe._unpatchify_latents(
                     x.transpose(1, 2).unflatten(2, (h // (2 * pipe.vae_scale_factor), -1))),
                 lambda pipe, x: pipe._patchify_latents(x))
_PLAIN = _Layout(lambda pipe: pipe.transformer.config.in_channels, lambda pipe, x, h, w: x, lambda pipe, x: x)
_FLUX = _Layout(lambda pipe: pipe.transformer.config.in_channels // 4,
                lambda pipe, x, h, w: pipe._unpack_latents(x, h, w, pipe.vae_scale_factor),
                lambda pipe, x: pipe._pack_latents(x, *x.shape))
_QWEN = _Layout(lambda pipe: pipe.transformer.config.in_channels // 4,
                lambda pipe, x, h, w: pipe._unpack_latents(x, h, w, pipe.vae_scale_factor)[:, :, 0],
                lambda pipe, x: pipe._pack_latents(x, *x.shape))
LAYOUTS = {
    FluxPipeline: _FLUX,
    FluxControlNetPipeline: _FLUX,  # its control image resized to each call's size by the pipeline
    ChromaPipeline: _FLUX,
    Flux2Pipeline: _FLUX2,
    Flux2KleinPipeline: _Layout(_FLUX2.channels, lambda pipe, x, h, w: _klein_grid(pipe, x, h, w), _FLUX2.from_grid),
    # Qwen-Image packs as FLUX.1 does; unpacked, its latent has a frame axis (B, C, 1, H, W)
    QwenImagePipeline: _QWEN,
    QwenImageControlNetPipeline: _QWEN,
    StableDiffusion3Pipeline: _PLAIN,
    StableDiffusion3ControlNetPipeline: _PLAIN,
    ZImagePipeline: _PLAIN,
    HunyuanImagePipeline: _PLAIN,
}


def _klein_grid(pipe, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.2 [klein]'s latent output is unpacked into the VAE's scale (its batch-norm statistics, kept per
    channel of the 2x2 patches, undone): back to the scale its noise and steps live in."""
    if x.ndim == 3:  # packed tokens: its noise
        return _FLUX2.to_grid(pipe, x, height, width)
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    mean, std = bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps)
    return pipe._unpatchify_latents((pipe._patchify_latents(x).float() - mean) / std).to(x.dtype)


class _Captured(Exception):
    """Raised by the spies once the pipeline has drawn its noise and set its timesteps: the call stops there."""


@dataclass
class StockStart:
    """Where a stock call starts: its noise levels (one per step) and its noise (in the pipeline's layout)."""

    sigmas: torch.Tensor
    noise: torch.Tensor


def stock_start(pipe, **call) -> StockStart:
    """The noise levels and the noise of a stock ``pipe(**call)``, read from the pipeline itself: spies on
    its ``prepare_latents`` and on a copy of its scheduler stop the call once it has both, before any step.
    The call draws its noise from ``generator`` as the stock call does."""
    seen = {}
    scheduler = copy.deepcopy(pipe.scheduler)
    set_timesteps, prepare_latents = scheduler.set_timesteps, pipe.prepare_latents

    def record(name, value):
        seen[name] = value
        if len(seen) == 2:
            raise _Captured()

    @functools.wraps(set_timesteps)  # the pipeline reads its signature (whether it takes sigmas=)
    def timesteps_spy(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        record("sigmas", scheduler.sigmas[:-1].float().cpu())

    def latents_spy(*args, **kwargs):
        out = prepare_latents(*args, **kwargs)
        record("noise", out[0] if isinstance(out, tuple) else out)  # FLUX also returns its position ids
        return out

    scheduler.set_timesteps = timesteps_spy
    own = pipe.__dict__.get("prepare_latents")  # an instance's own (a user's patch), kept
    stock, pipe.scheduler, pipe.prepare_latents = pipe.scheduler, scheduler, latents_spy
    try:
        pipe(**{**call, "output_type": "latent"})
    except _Captured:
        return StockStart(**seen)
    finally:
        pipe.scheduler = stock
        if own is None:
            del pipe.prepare_latents  # the class's own again
        else:
            pipe.prepare_latents = own
    raise RuntimeError(f"{type(pipe).__name__} never drew its noise and set its timesteps before its first step: "
                       "it cannot run progressive resolution")


def _layout(pipe) -> _Layout:
    for cls, layout in LAYOUTS.items():
        if isinstance(pipe, cls):
            return layout
    raise ValueError(f"progressive resolution runs in {', '.join(c.__name__ for c in LAYOUTS)}, not in "
                     f"{type(pipe).__name__}; on another pipeline, compare against the fewer-steps rows")


def check_progressive(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The full height and width, after refusing what progressive resolution cannot run on."""
    _layout(pipe)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"progressive resolution needs a FlowMatchEulerDiscreteScheduler (its steps are noise "
                         f"levels sigma), not {type(pipe.scheduler).__name__}")
    for flag in ("invert_sigmas", "stochastic_sampling"):  # rising sigmas; fresh noise at the switch
        if pipe.scheduler.config.get(flag):
            raise ValueError(f"progressive resolution needs a scheduler without {flag}=True")
    default = getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor  # Z-Image has none: 1024
    height, width = height or default, width or default
    multiple = 4 * pipe.vae_scale_factor  # the half size must still fill whole 2x2 patches
    if height % multiple or width % multiple:
        raise ValueError(f"progressive resolution halves the image: height and width must be multiples of "
                         f"{multiple}, got {height}x{width}")
    return height, width


def progressive_call(pipe, switch: float | ProgressiveResolution, **call):
    """``pipe(**call)`` with every step above noise level ``switch`` at half resolution (see module doc).

    ``call`` is what the stock call takes; ``generator`` (one per sample) gives the same noise
    as there, and is left where the stock call leaves it. Returns the second call's output, as
    ``pipe(**call)`` would.
    """
    policy = switch if isinstance(switch, ProgressiveResolution) else ProgressiveResolution(switch)
    layout = _layout(pipe)
    height, width = _checked(pipe, call)
    rewind = _random_state(call)  # each call starts where the stock call starts
    start = stock_start(pipe, height=height, width=width, **call)
    drawn = _random_state(call)  # and after the last, the state is where the stock call leaves it
    sigmas, half_steps = start.sigmas, sum(policy.half(float(s)) for s in start.sigmas)
    if half_steps == len(sigmas):
        raise ValueError(f"switch {policy.switch} is below every step's noise level (the last is "
                         f"{float(sigmas[-1]):.3g}): nothing would run at full resolution")
    grid = layout.to_grid(pipe, start.noise, height, width)
    stock = pipe.scheduler
    try:
        rewind()
        if half_steps == 0:
            return pipe(height=height, width=width, latents=layout.from_grid(pipe, grid), **call)
        grid = dct_resize(grid, (grid.shape[-2] // 2, grid.shape[-1] // 2), keep="energy")
        pipe.scheduler = _exact_sigmas(stock)

        def stop(pipeline, step, timestep, outputs):
            pipeline._interrupt = step + 1 >= half_steps
            return outputs

        early = pipe(height=height // 2, width=width // 2, sigmas=sigmas.tolist(), latents=layout.from_grid(pipe, grid),
                     callback_on_step_end=stop, **{**call, "output_type": "latent", "return_dict": True}).images
        grid = layout.to_grid(pipe, early, height // 2, width // 2)
        grid = dct_resize(grid, (2 * grid.shape[-2], 2 * grid.shape[-1]), keep="amplitude")
        rewind()
        return pipe(height=height, width=width, sigmas=sigmas[half_steps:].tolist(),
                    latents=layout.from_grid(pipe, grid), **call)
    finally:
        pipe.scheduler = stock
        drawn()


def _random_state(call: dict) -> Callable[[], None]:
    """A function that puts the call's generators and torch's global random state (the CPU's, every initialised CUDA
    device's) back to what they are now: each of progressive resolution's stock calls then draws what the one stock
    call draws besides its noise, which they are given (a ControlNet pipeline samples its control image's latent,
    from the generator or, SD3's, from the global state)."""
    generators = call.get("generator")
    generators = [g for g in (generators if isinstance(generators, list) else [generators]) if g is not None]
    states, cpu = [g.get_state() for g in generators], torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore():
        for generator, state in zip(generators, states):
            generator.set_state(state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    return restore


def half_resolution_steps(pipe, switch: float | ProgressiveResolution, **call) -> list[bool]:
    """Per step of ``progressive_call(pipe, switch, **call)``, whether it runs at half resolution."""
    policy = switch if isinstance(switch, ProgressiveResolution) else ProgressiveResolution(switch)
    height, width = _checked(pipe, call)
    return [policy.half(float(s)) for s in stock_start(pipe, height=height, width=width, **call).sigmas]


def _checked(pipe, call: dict) -> tuple[int, int]:
    """The full height and width (taken out of ``call``), after refusing the call's arguments that two stock calls
    cannot split between them."""
    for name in ("sigmas", "latents", "timesteps", "callback_on_step_end", "skip_guidance_layers"):
        if call.get(name) is not None:  # SD3's skip-layer guidance counts steps from each call's start
            raise ValueError(f"progressive_call cannot take {name}=: it sets the schedule and the latents itself")
    guided = [name for name, default in (("control_guidance_start", 0.0), ("control_guidance_end", 1.0))
              if call.get(name) is not None and any(v != default for v in np.atleast_1d(call[name]))]
    if guided:  # fractions of each call's own steps, which progressive resolution splits in two calls
        raise ValueError(f"progressive_call cannot take {guided[0]}= other than {0.0 if 'start' in guided[0] else 1.0}"
                         ": the ControlNet pipeline counts it in each of its two calls' steps")
    if call.get("caption_upsample_temperature") is not None:  # sampled from the global RNG at every call
        raise ValueError("progressive_call cannot take caption_upsample_temperature=: each of its calls would "
                         "sample another caption; upsample the prompt once and pass the result as the prompt")
    if sized_by_image(pipe, call):
        raise ValueError(f"{type(pipe).__name__} sizes its output after the image unless given one: pass height= "
                         "and width= to progressive_call")
    return check_progressive(pipe, call.pop("height", None), call.pop("width", None))


def _exact_sigmas(scheduler: FlowMatchEulerDiscreteScheduler) -> FlowMatchEulerDiscreteScheduler:
    """A copy that runs the ``sigmas`` it is given as they are: they are already the stock call's, shifted."""
    return FlowMatchEulerDiscreteScheduler.from_config(
        scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False)
