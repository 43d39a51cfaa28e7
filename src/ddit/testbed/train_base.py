"""Train the testbed's base DiT: rectified flow on the procedural images.

x_t = (1 - t) x_0 + t noise, the model predicts the velocity noise - x_0, t is
logit-normal (SD3), labels are dropped 10% of the time for classifier-free
guidance, weights are averaged by EMA and the EMA copy is what ships. Every
random draw of step k comes from a generator seeded by (seed, k), so a resumed
run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint import TrainingRun
from .base_model import NULL_LABEL, build_base_model
from .data import make_dataset


@dataclass
class BaseTrainConfig:
    steps: int = 2400
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    num_images: int = 20000
    seed: int = 0
    bf16: bool = False  # only pays on CPUs with native bf16 (AVX512-BF16/AMX)
    model_overrides: dict | None = None  # e.g. a tiny model for tests


def flow_matching_loss(model, x0, labels, g: torch.Generator) -> torch.Tensor:
    """MSE between predicted and true velocity at logit-normal t."""
    t = torch.sigmoid(torch.randn(len(x0), generator=g))
    noise = torch.randn(x0.shape, generator=g)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = model(xt, timestep=t * 1000, class_labels=labels, return_dict=False)[0]
    return torch.nn.functional.mse_loss(v.float(), noise - x0)


def train_base(out: str | Path, config: BaseTrainConfig, resume: bool = False,
               checkpoint_minutes: float = 3.0, progress: bool = True) -> Path:
    """Train, checkpointing to ``out/checkpoint.pt``; export the EMA model to ``out/ema``."""
    out = Path(out)
    images, labels = make_dataset(config.num_images, config.seed)
    torch.manual_seed(config.seed)  # the initial weights
    model = build_base_model(**(config.model_overrides or {}))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup))
    run = TrainingRun(out / "checkpoint.pt", config, desc="train-base", minutes=checkpoint_minutes,
                      progress=progress, model=model, ema=ema, optimizer=opt, lr_schedule=sched)
    if resume:
        run.restore()

    model.train()
    for step in run.steps():
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (config.batch_size,), generator=g)
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=g) < config.label_dropout] = NULL_LABEL
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = flow_matching_loss(model, images[idx], y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        run.log(loss.item())

    export = out / "ema"
    ema.module.save_pretrained(export)
    (out / "training.json").write_text(json.dumps(
        {"config": asdict(config), "steps": run.state["step"], "train_seconds": round(run.state["seconds"], 1),
         "losses": run.state["losses"]}, indent=1))
    return export
