"""The float32 latents that a low-precision pipeline's scheduler rounds away, for the policies' signals.

A bf16 pipeline's scheduler casts the latent back to bf16 at every step. The policies read
third differences of consecutive latents, and those of bf16 latents are mostly rounding
noise (about 3e-3 per patch on FLUX, above the default tau of 8e-4): the default policy
would never go coarse. So ``PreciseLatents`` wraps the pipeline's ``scheduler.step``: at a
generation's first step it copies the scheduler, and the copy steps a float32 latent with
the same model outputs, in lockstep. The pipeline's own latents and images are unchanged.
Only deterministic schedulers are followed (a stochastic step would draw noise twice).
"""

from __future__ import annotations

import copy
import types
import warnings
import weakref

import torch

#: Schedulers whose step draws no noise (in the configurations ``_deterministic`` accepts).
DETERMINISTIC = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


class PreciseLatents:
    """Follows one pipeline's scheduler; ``latent_for(hidden)`` gives the float32 twin of the latent that a
    transformer call receives, or None where it has none (a float32 pipeline needs none)."""

    def __init__(self):
        self._latent: torch.Tensor | None = None  # the float32 latent, in the scheduler's layout
        self._rounded: torch.Tensor | None = None  # the pipeline's own latent after the same step
        self._twin = None
        self._watched: weakref.WeakSet = weakref.WeakSet()

    def watch(self, scheduler) -> None:
        """Wrap ``scheduler.step`` (once; a scheduler swapped in after ``enable`` is wrapped at its first use).

        The wrapper is bound to the scheduler, so that a copy the pipeline makes of it (SkyReels-V2's diffusion
        forcing copies one per frame) steps itself, as its class does, and is not followed."""
        if scheduler is None or scheduler in self._watched or not hasattr(scheduler, "step"):
            return
        original = scheduler.step

        def step(bound, model_output, timestep, sample, *args, **kwargs):
            if bound is not scheduler:  # a deepcopy's rebound wrapper
                return type(bound).step(bound, model_output, timestep, sample, *args, **kwargs)
            self._before(scheduler, sample, kwargs)
            out = original(model_output, timestep, sample, *args, **kwargs)
            if self._twin is not None:
                rounded = out[0] if isinstance(out, tuple) else out.prev_sample
                twin_kwargs = {**kwargs, "return_dict": False}
                self._latent = self._twin.step(model_output.float(), timestep, self._latent, *args,
                                               **twin_kwargs)[0].float()
                self._rounded = rounded
            return out

        scheduler.step = types.MethodType(step, scheduler)
        self._watched.add(scheduler)

    def unwatch(self) -> None:
        for scheduler in list(self._watched):
            vars(scheduler).pop("step", None)
        self._watched = weakref.WeakSet()
        self._latent = self._rounded = self._twin = None

    def _before(self, scheduler, sample: torch.Tensor, kwargs: dict) -> None:
        """Start a twin at a generation's first step (the sample is not the one the last step gave)."""
        rounded = self._rounded
        if rounded is not None and (sample is rounded or sample.shape == rounded.shape
                                    and torch.equal(sample, rounded)):
            return  # the generation goes on
        self._latent = self._rounded = self._twin = None
        if sample.dtype == torch.float32:
            return
        if not _deterministic(scheduler, kwargs):
            warnings.warn(f"ddit's policy reads this pipeline's {str(sample.dtype).removeprefix('torch.')} latents: "
                          f"{type(scheduler).__name__} may draw noise in a step, which a float32 twin would draw "
                          "twice; third differences of rounded latents are mostly rounding noise, so set the "
                          "policy's tau on this pipeline (the budget policy fits it) or use a deterministic "
                          f"scheduler ({', '.join(DETERMINISTIC)})", stacklevel=3)
            return
        twin = copy.deepcopy(scheduler)
        vars(twin).pop("step", None)  # the copy steps as the class does
        self._twin, self._latent = twin, sample.float()

    def latent_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden`` (a transformer call's first argument) with the float32 latent in place of the rounded one
        it holds at its start (its first rows, tokens and channels; every row block of a batched CFG call) or at
        the end of its tokens (Qwen-Image 2.1 puts condition images' tokens first), or None if it holds no rounded
        latent of the last step."""
        rounded, latent = self._rounded, self._latent
        if rounded is None or not torch.is_tensor(hidden) or hidden.ndim != rounded.ndim or hidden.ndim < 2:
            return None
        if len(hidden) % len(rounded) or any(h < r for h, r in zip(hidden.shape[1:], rounded.shape[1:])):
            return None
        rest = [slice(0, r) for r in rounded.shape[2:]]
        tokens, count = hidden.shape[1], rounded.shape[1]
        for where in ((slice(None), slice(0, count), *rest), (slice(None), slice(tokens - count, tokens), *rest)):
            if torch.equal(hidden[: len(rounded)][where], rounded):
                blocks = hidden.float().unflatten(0, (-1, len(rounded)))
                blocks[(slice(None), *where)] = latent.to(blocks.device)
                return blocks.flatten(0, 1)
        return None


def _deterministic(scheduler, kwargs: dict) -> bool:
    config = getattr(scheduler, "config", {})
    return (type(scheduler).__name__ in DETERMINISTIC and kwargs.get("generator") is None
            and not getattr(config, "stochastic_sampling", False)
            and "sde" not in str(getattr(config, "algorithm_type", "")))
