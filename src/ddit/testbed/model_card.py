"""Ship a trained base model: weights, loss curve, samples, measured quality, model card.

``ddit testbed ship-base --run runs/base`` turns a finished ``train-base`` run
into the folder that ships inside the package, so that every number in the
card is produced by the same command that places the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..images import save_grid  # noqa: E402
from .base_model import SHIPPED_BASE, generate, load_base_model  # noqa: E402
from .data import PROMPTS  # noqa: E402
from .evaluate import evaluate_model  # noqa: E402
from .evaluator import Evaluator  # noqa: E402

WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def plot_loss(losses: list[float], path: Path, window: int = 50) -> None:
    window = min(window, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(losses, alpha=0.25, lw=0.5, label="per step")
    ax.plot(np.arange(window - 1, len(losses)), smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="velocity MSE", yscale="log", title="train-base loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ship_base(run: str | Path, evaluator: Evaluator, dest: str | Path = SHIPPED_BASE, *,
              num: int = 512, steps: int = 50, guidance: float = 2.0, seed: int = 0) -> dict:
    run, dest = Path(run), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
        shutil.copy2(run / "ema" / name, dest / name)
    training = json.loads((run / "training.json").read_text())
    plot_loss(training["losses"], dest / "loss.png")

    model = load_base_model(dest)
    rows = torch.arange(len(PROMPTS)).repeat_interleave(8)
    save_grid(generate(model, rows, seed=seed, steps=steps, guidance=guidance).images, dest / "samples.png")
    quality = evaluate_model(model, evaluator, num=num, steps=steps, guidance=guidance, seed=seed,
                             progress=True)
    (dest / "eval.json").write_text(json.dumps(quality, indent=1))
    (dest / "README.md").write_text(_card(training, quality, model))
    return quality


def _card(training: dict, quality: dict, model) -> str:
    cfg = training["config"]
    params = sum(p.numel() for p in model.parameters())
    per_class = "\n".join(f"| {p} | {v:.3f} |" for p, v in quality["adherence_per_class"].items())
    return f"""# Testbed base model

A class-conditional `diffusers.DiTTransformer2DModel` (the class of facebook/DiT-XL-2)
trained on ddit's procedural images ({", ".join(PROMPTS)}), 3x32x32 pixels, patch size 2,
{params / 1e6:.2f}M parameters. These are the EMA weights.

## How it was made
```
ddit testbed train-base --out runs/base --steps {training["steps"]} --batch-size {cfg["batch_size"]} --lr {cfg["lr"]} --seed {cfg["seed"]}
ddit testbed ship-base --run runs/base
```
Rectified flow (velocity target), logit-normal t, {cfg["label_dropout"]:.0%} label dropout for
classifier-free guidance, AdamW, EMA decay {cfg["ema_decay"]}, fp32 on a 2-core AVX2 CPU:
{training["steps"]} steps of batch {cfg["batch_size"]} in {training["train_seconds"] / 60:.0f} minutes of wall time.

![loss](loss.png)

## Samples
{quality["steps"]} Euler steps (`FlowMatchEulerDiscreteScheduler`), guidance {quality["guidance"]}, seed {quality["seed"]};
one row per class, in the order above.

![samples](samples.png)

## Quality (written by `ship-base`; `ddit testbed eval --num {quality["num"]} --json` measures it again)
{quality["num"]} images balanced over the classes, judged by the shipped evaluator.

| measure | value |
|---|---|
| adherence | {quality["adherence"]:.3f} |
| FD to held-out real images | {quality["fd"]:.3f} |
| FD real vs real (floor) | {quality["fd_real_floor"]:.3f} |

| class | adherence |
|---|---|
{per_class}
"""
