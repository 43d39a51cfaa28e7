"""Is the adapter's patch-4 error a matter of LoRA's capacity? Train every weight and see.

    python benchmarks/adapter_capacity.py --steps 3000     # about 46 minutes, one thread
    python benchmarks/adapter_capacity.py --steps 5000 --arms full     # is it still falling?
    python benchmarks/adapter_capacity.py --steps 3000 --arms lora_mid  # the weighting over t

An upper-bound probe for issue 11, part 3 (targets: relative error <= 0.10 for t >= 0.3,
<= 0.20 below). Two copies of the shipped adapter go on training at patch 4 only, against
the frozen patch-2 base model (Eq. 1), on the same batches, optimiser and learning rate:
- ``lora``: only the adapter's own parameters train, as ``ddit distill`` does;
- ``full``: every weight of the model trains too (a coarse-only copy of the whole
  transformer, what no adapter could beat at this size);
- ``lora_mid``: the adapter alone again, on the noise levels 0.3 <= t <= 0.7 only (its own
  batches of the same images): the most a weighting over t can move to mid t, where the
  error is largest. If it stays above 0.10 there, no weighting of ``ddit distill`` reaches
  the target.
If ``full`` reaches the targets, the adapter's low rank is what holds it back; if ``full``
stops where ``lora`` does, 64 tokens cannot carry what 256 do for this model, and no
adapter will. Relative error ||student - teacher|| / ||teacher|| on 64 held-out images per
noise level. Results: docs/adapter.md, "Is it the rank? Training every weight".
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

from ddit.distill import NoisedLatents, sampler_sigmas
from ddit.testbed.adapter import distillation_data, load_multipatch_model
from ddit.testbed.adapter_card import HELD_OUT_SEED
from ddit.testbed.base_model import load_base_model
from ddit.testbed.data import make_dataset

PATCH = 4
MID = (0.3, 0.7)


def held_out(num: int = 64):
    """64 held-out images at every 5th sampler level, one noise draw: (level, z_t, kwargs) triples."""
    images, labels = make_dataset(num, HELD_OUT_SEED)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return [(s, (1 - s) * images + s * noise,
             dict(timestep=torch.full((num,), s * 1000), class_labels=labels, return_dict=False))
            for s in sampler_sigmas(50)[::5].tolist()]


@torch.no_grad()
def errors(student, teacher, cases) -> list[float]:
    out = []
    for _, z, kw in cases:
        t, s = teacher(z, **kw)[0], student(z, patch_size=PATCH, **kw)[0]
        out.append(((s - t).norm() / t.norm()).item())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--arms", default="lora,full", help="which copies train: lora, full, lora_mid (comma-separated)")
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher = load_base_model().eval().requires_grad_(False)
    shipped = load_multipatch_model()
    sigmas = sampler_sigmas(50)
    images = distillation_data(6144, seed=0)
    data = NoisedLatents(images, sigmas, timestep_scale=1000.0)
    mid = NoisedLatents(images, sigmas[(sigmas >= MID[0]) & (sigmas <= MID[1])], timestep_scale=1000.0)
    cases = held_out()
    arms = {}
    for name in args.arms.split(","):
        model = copy.deepcopy(shipped).train()
        trainable = [q for q in model.parameters() if q.requires_grad]
        if name == "full":
            model.requires_grad_(True)
            trainable = list(model.parameters())
        if name not in ("lora", "full", "lora_mid"):
            raise SystemExit(f"--arms: unknown arm {name!r}; choose from lora, full, lora_mid")
        arms[name] = (model, torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0))
        print(f"{name}: {sum(q.numel() for q in trainable):,} trainable parameters", flush=True)
    start = errors(shipped, teacher, cases)
    generators, t0 = {source: torch.Generator().manual_seed(1) for source in (data, mid)}, time.time()
    for step in range(args.steps):
        batches = {}
        for name, (model, opt) in arms.items():
            source = mid if name == "lora_mid" else data
            if source not in batches:
                z, kw = source.draw(generators[source], args.batch_size)
                with torch.no_grad():
                    batches[source] = z, kw, teacher(z, **kw, return_dict=False)[0]
            z, kw, target = batches[source]
            loss = F.mse_loss(model(z, patch_size=PATCH, **kw, return_dict=False)[0], target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step} ({time.time() - t0:.0f} s)", flush=True)
    levels = [s for s, _, _ in cases]
    print("| t | " + " | ".join(f"{s:.2f}" for s in levels) + " | mean |")
    print("|---" * (len(levels) + 2) + "|")
    for name, errs in [("shipped", start)] + [(n, errors(m.eval(), teacher, cases)) for n, (m, _) in arms.items()]:
        print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errs) + f" | {sum(errs) / len(errs):.3f} |")


if __name__ == "__main__":
    main()
