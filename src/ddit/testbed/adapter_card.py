"""Ship a distilled testbed adapter: weights, error before/after distillation, sample grids, card.

``ddit testbed ship-adapter --run runs/adapter`` places a finished ``ddit
distill`` run in the package and measures what the card reports: the relative
error ||f_coarse - f_teacher|| / ||f_teacher|| of each coarse size against the
base model at the noise levels the sampler visits, for the PPFlow-initialised
adapter before distillation and for the distilled one, and 50-step samples run
entirely at each size, so the cost of coarse steps is visible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from matplotlib.figure import Figure
import torch  # noqa: E402

from ..adapter import MultiPatchTransformer  # noqa: E402
from ..distill import sampler_sigmas  # noqa: E402
from ..images import save_grid  # noqa: E402
from ..policies import get_policy  # noqa: E402
from .adapter import SHIPPED_ADAPTER  # noqa: E402
from .base_model import SHIPPED_BASE, generate, load_base_model  # noqa: E402
from .data import PROMPTS, make_dataset  # noqa: E402
from .evaluator import Evaluator, classify  # noqa: E402

HELD_OUT_SEED = 7003  # images neither the base model nor the adapter trained on


@torch.no_grad()
def relative_errors(model: MultiPatchTransformer, sigmas: torch.Tensor, num: int = 32, seed: int = 0) -> dict:
    """{size: [error at each sigma]}: coarse prediction vs the base prediction on noised held-out images."""
    images, labels = make_dataset(num, HELD_OUT_SEED)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    errors = {size: [] for size in model.patch_sizes[1:]}
    for sigma in sigmas.tolist():
        z = (1 - sigma) * images + sigma * noise
        kwargs = dict(timestep=torch.full((num,), sigma * 1000), class_labels=labels, return_dict=False)
        teacher = model(z, **kwargs)[0]
        for size in errors:
            student = model(z, patch_size=size, **kwargs)[0]
            errors[size].append(((student - teacher).norm() / teacher.norm()).item())
    return errors


def plot_errors(sigmas, before: dict, after: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for i, size in enumerate(before):
        ax.plot(sigmas, before[size], "--", color=f"C{i}", label=f"patch {size}, PPFlow init")
        ax.plot(sigmas, after[size], "-", color=f"C{i}", label=f"patch {size}, distilled")
    ax.set(xlabel="t (1 = noise)", ylabel="relative error to patch-2 teacher", yscale="log")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ship_adapter(run: str | Path, evaluator: Evaluator, dest: str | Path = SHIPPED_ADAPTER, *,
                 base: str | Path = SHIPPED_BASE, steps: int = 50, guidance: float = 2.0,
                 per_class: int = 4) -> dict:
    run, dest = Path(run), Path(dest)
    shutil.copytree(run / "adapter", dest, dirs_exist_ok=True)
    distilled = MultiPatchTransformer.from_pretrained(load_base_model(base), dest).eval()
    initial = MultiPatchTransformer(load_base_model(base), distilled.patch_sizes,
                                    lora_config=distilled.lora_config, shared_lora=distilled.shared_lora).eval()
    sigmas = sampler_sigmas(steps)[::5]
    before, after = relative_errors(initial, sigmas), relative_errors(distilled, sigmas)
    plot_errors(sigmas.tolist(), before, after, dest / "relative_error.png")

    labels = torch.arange(len(PROMPTS)).repeat_interleave(per_class)
    adherence = {}
    for size in distilled.patch_sizes:
        policy = get_policy("fixed", schedule=[size] * steps)
        images = generate(distilled, labels, steps=steps, guidance=guidance, policy=policy).images
        save_grid(images, dest / f"samples_patch{size}.png", ncol=per_class)
        adherence[size] = (classify(evaluator, images) == labels).float().mean().item()

    report = {"sigmas": sigmas.tolist(), "relative_error_before": before, "relative_error_after": after,
              "adherence_all_steps_at_size": adherence, "samples_per_class": per_class,
              "distill": {k: v for k, v in json.loads((run / "distill.json").read_text()).items() if k != "losses"}}
    (dest / "card.json").write_text(json.dumps(report, indent=1))
    (dest / "README.md").write_text(_card(report, distilled))
    return report


def _against_target(report: dict, size) -> str:
    """The error at the first coarse size against issue 11's target, as measured."""
    over = [(sigma, error - (0.10 if sigma >= 0.3 else 0.20))
            for sigma, error in zip(report["sigmas"], report["relative_error_after"][size])]
    over = [(sigma, by) for sigma, by in over if by > 0]
    target = f"Issue 11's target for patch {size} (<= 0.10 for t >= 0.3, <= 0.20 below)"
    if not over:
        return f"{target}: met at every level."
    worst = max(over, key=lambda o: o[1])
    return (f"{target}: missed at {len(over)} of {len(report['sigmas'])} levels, by {min(b for _, b in over):.2f} to "
            f"{worst[1]:.2f} (the most at t = {worst[0]:.2f}). Rank 32, on-policy states, a detail head and even "
            "retraining every weight of the model at the coarse size do not close the gap (docs/adapter.md, "
            "\"Where the error is\").")


def _card(report: dict, model: MultiPatchTransformer) -> str:
    d = report["distill"]
    cfg = d["config"]
    sizes = list(report["relative_error_before"])
    head = " | ".join(f"patch {s} before | patch {s} after" for s in sizes)
    rows = "\n".join(
        f"| {sigma:.2f} | " + " | ".join(f"{report['relative_error_before'][s][i]:.3f} | "
                                        f"{report['relative_error_after'][s][i]:.3f}" for s in sizes) + " |"
        for i, sigma in enumerate(report["sigmas"]))
    grids = "\n".join(f"| {s} | {report['adherence_all_steps_at_size'][s]:.2f} | ![](samples_patch{s}.png) |"
                      for s in report["adherence_all_steps_at_size"])
    params = sum(p.numel() for p in model.trainable_parameters())
    return f"""# Testbed multi-patch adapter

Lets the testbed base model (patch {model.base_patch_size}) also run at patch sizes
{", ".join(map(str, sizes))}: per size a patch embedding, a de-embedding, a residual
1x1 map from the latent, and a LoRA adapter (rank {model.lora_config.r}) on every block's
attention and feed-forward; {params / 1e6:.2f}M trainable parameters in all.

## How it was made
```
ddit distill --out runs/adapter --steps {d["steps"]} --batch-size {cfg["batch_size"]} --lr {cfg["lr"]} --seed {cfg["seed"]}
ddit testbed ship-adapter --run runs/adapter
```
Distillation (DDiT Eq. 1) against the frozen base model at patch {model.base_patch_size}, t drawn from the
{cfg["num_inference_steps"]} noise levels of the Euler sampler: {d["steps"]} steps in {d["seconds"] / 60:.0f} minutes
on a 2-core CPU.

## Relative error to the base model
||f_coarse - f_base|| / ||f_base|| on 32 noised held-out images, before distillation
(PPFlow initialisation) and after.

| t | {head} |
|---|{"---|" * 2 * len(sizes)}
{rows}

{_against_target(report, sizes[0])}

![relative error](relative_error.png)

## Every step at one size
{report["samples_per_class"]} samples per class, {len(report["sigmas"]) * 5} steps, guidance 2, seed 0; adherence by the
shipped evaluator on these few images.

| patch size | adherence | samples |
|---|---|---|
{grids}
"""
