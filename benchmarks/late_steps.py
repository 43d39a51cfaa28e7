"""What one coarse step costs at each point of the trajectory (issue 13, part 5).

    python benchmarks/late_steps.py [--num-per-class 16] [--sizes 8] [--steps-at 0,10,20,30,35,40,45,49]

Tuning seeds (0..), shipped model and adapter, 50 steps, guidance 2. For each k, the
baseline's trajectory up to step k (shared, sampled once), then step k alone at a coarse
patch size, then the base size to the end: the images differ from the baseline's only by
that one step. Per k: FD to real images (new evaluator), SSIM to the baseline twin, and
the high-frequency energy (mean squared difference between an image and its 2x2-block
mean, the measure of issue 13) relative to the baseline's: above 1 = noise left behind.
"""

import argparse

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from ddit.sampling import default_scheduler, guided, initial_noise, transformer_velocity
from ddit.testbed.adapter import load_multipatch_model
from ddit.testbed.base_model import NULL_LABEL
from ddit.testbed.data import make_dataset
from ddit.testbed.evaluate import REAL_SEEDS, balanced_labels
from ddit.testbed.evaluator import frechet_distance, load_evaluator

STEPS, GUIDANCE = 50, 2.0


def high_freq(images: torch.Tensor) -> float:
    """Mean squared difference between an image and its 2x2-block mean."""
    blocks = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
    return ((images - blocks) ** 2).mean().item()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    unit = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    return structural_similarity_index_measure(unit(a), unit(b), data_range=1.0).item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-per-class", type=int, default=16)
    parser.add_argument("--sizes", default="8")
    parser.add_argument("--steps-at", default="0,10,20,30,35,40,45,49")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.steps_at.split(",")]

    model = load_multipatch_model()
    model.set_lean_base(True)
    fn = guided(transformer_velocity(model), GUIDANCE, NULL_LABEL)
    base = model.patch_sizes[0]
    scheduler = default_scheduler()
    scheduler.set_timesteps(STEPS)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    labels = balanced_labels(4 * args.num_per_class)

    def step(x, i, size):  # one Euler step of the flow-matching scheduler
        v = fn(x, timesteps[i].expand(len(x)), labels, size).float()
        return x + (sigmas[i + 1] - sigmas[i]) * v

    x = initial_noise(torch.arange(len(labels)), (3, 32, 32))
    saved = {}
    for i in range(STEPS):
        if i in ks:
            saved[i] = x.clone()
        x = step(x, i, base)
    baseline = x

    evaluator = load_evaluator()
    reals = make_dataset(len(labels), REAL_SEEDS[0])[0]
    floor = frechet_distance(evaluator, reals, make_dataset(len(labels), REAL_SEEDS[1])[0])
    hf_base = high_freq(baseline)
    print(f"{len(labels)} images; baseline FD {frechet_distance(evaluator, reals, baseline):.2f} "
          f"(real-vs-real floor {floor:.2f}), high-freq energy {hf_base:.4f}")
    print("| k | sigma | patch | FD | SSIM to baseline | high-freq energy / baseline's |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        for size in sizes:
            x = step(saved[k], k, size)
            for i in range(k + 1, STEPS):
                x = step(x, i, base)
            print(f"| {k} | {sigmas[k]:.2f} | {size} | {frechet_distance(evaluator, reals, x):.2f} | "
                  f"{ssim(x, baseline):.3f} | {high_freq(x) / hf_base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
