"""Does distilling on the states a coarse schedule visits ("on-policy") lower the adapter's error?

    python benchmarks/on_policy_states.py [--steps 300] [--out runs/on-policy]

The shipped testbed adapter was distilled on clean images noised at the sampler's levels
(``NoisedLatents``). At sampling time, after a coarse step, the latent is one the base
model would never produce, and that is where the adapter must be right too. This study
records the inputs of every model call while ``third_order`` samples (the
``MultiPatchTransformer``'s calls, at every size, CFG branches included), fine-tunes two
copies of the shipped adapter for the same number of steps, one on more noised latents
and one on the recorded states, and measures both (and the shipped one) on held-out data
of both kinds: the relative error ||student - teacher|| / ||teacher|| at patch 4 and 8,
for t >= 0.3 and t < 0.3.

Training states come from seeds 30000+, held-out ones from 40000+ (used for nothing else);
held-out noised latents from data seed 5 (the adapter trained on seed 0).
"""

import argparse
import json
from pathlib import Path

import torch

from ddit.distill import DistillConfig, NoisedLatents, distill, sampler_sigmas
from ddit.policies import get_policy
from ddit.recorded_states import RecordedStates, recording
from ddit.testbed.adapter import distillation_data, load_multipatch_model
from ddit.testbed.base_model import generate
from ddit.testbed.evaluate import balanced_labels

SAMPLES, HELD_OUT = 128, 64


def record(folder: Path, seed: int, num: int) -> RecordedStates:
    """The inputs of every model call of ``third_order`` sampling ``num`` images, 64 per file."""
    folder.mkdir(parents=True, exist_ok=True)
    model = load_multipatch_model()
    for start in range(0, num, 64):
        path = folder / f"{start:05d}.safetensors"
        if path.exists():
            continue
        with recording(model) as log:
            generate(model, balanced_labels(num)[start:start + 64], seed=seed + start, steps=50, guidance=2.0,
                     policy=get_policy("third_order"), batch_size=64)
        log.save(path, prompt=f"testbed third_order, seeds {seed + start}+")
    return RecordedStates(folder)


@torch.no_grad()
def errors(model, states, batches: int = 16) -> dict[str, float]:
    """Mean relative error per (patch size, t >= 0.3 or below) over fixed batches of ``states``."""
    sums = {}
    for b in range(batches):
        z, kwargs = states.draw(torch.Generator().manual_seed(b), 64)
        teacher = model(z, **kwargs, return_dict=False)[0]
        t = kwargs["timestep"].float() / 1000
        for size in model.patch_sizes[1:]:
            student = model(z, patch_size=size, **kwargs, return_dict=False)[0]
            rel = (student - teacher).flatten(1).norm(dim=1) / teacher.flatten(1).norm(dim=1)
            for name, mask in ((f"p{size} t>=0.3", t >= 0.3), (f"p{size} t<0.3", t < 0.3)):
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + rel[mask].sum().item(), count + int(mask.sum()))
    return {name: round(total / count, 4) for name, (total, count) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/on-policy"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_states = record(args.out / "states-train", 30_000, SAMPLES)
    held_states = record(args.out / "states-held-out", 40_000, HELD_OUT)
    held_noised = NoisedLatents(distillation_data(2048, seed=5), sampler_sigmas(50), 1000.0)
    arms = {
        "shipped": None,
        "noised latents": (distillation_data(seed=0), DistillConfig(steps=args.steps, batch_size=16, lr=1e-4)),
        "on-policy states": (train_states, DistillConfig(steps=args.steps, batch_size=16, lr=1e-4,
                                                         num_inference_steps=None, timestep_scale=None)),
    }
    results = {}
    for name, arm in arms.items():
        model = load_multipatch_model()
        if arm is not None:
            data, config = arm
            distill(model, data, args.out / name.replace(" ", "-"), config, resume=False)
        model.eval()
        results[name] = {"held-out on-policy states": errors(model, held_states),
                         "held-out noised latents": errors(model, held_noised)}
        print(name, json.dumps(results[name]))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
