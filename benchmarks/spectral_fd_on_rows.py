"""Spectral FD and FD of every row of a finished ablation, and their known answers on its baseline.

    python benchmarks/spectral_fd_on_rows.py runs/benchmark-targets-HASH

The known answers (issue 13): the baseline's images split into two seed sets of the same
classes (the metric's spread between them), then the second set with Gaussian noise of
std 0.05 added, and blurred with a 3x3 box. A metric the report can lead with must get
worse under both by more than that spread.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddit.ablate.runner import load_images
from ddit.testbed.data import PROMPTS, make_dataset
from ddit.testbed.evaluate import REAL_SEEDS, balanced_labels
from ddit.testbed.evaluator import frechet_distance, load_evaluator
from ddit.testbed.spectrum import spectral_fd


def main(out: Path) -> None:
    evaluator = load_evaluator()
    config = json.loads((out / "config.json").read_text())
    n = config["num_per_class"] * len(PROMPTS)
    reals, real_labels = make_dataset(n, REAL_SEEDS[0])
    floor = spectral_fd(reals, make_dataset(n, REAL_SEEDS[1])[0])
    print(f"{n} images per row; real-vs-real floor: spectral FD {floor:.2f}")
    for key in config["rows"]:
        images = load_images(out, key)
        print(f"{key:34s} spectral FD {spectral_fd(reals, images):8.2f}  FD {frechet_distance(evaluator, reals, images):.3f}")

    base, labels = load_images(out, "baseline"), balanced_labels(n)
    first = (torch.arange(n) // len(PROMPTS)) % 2 == 0  # two halves, each with every class
    half_reals = reals[: n // 2]
    second = base[~first]
    variants = {"baseline, first half": base[first], "baseline, second half": second,
                "second half + noise 0.05": second + 0.05 * torch.randn(second.shape,
                                                                       generator=torch.Generator().manual_seed(0)),
                "second half, 3x3 box blur": F.avg_pool2d(second, 3, stride=1, padding=1, count_include_pad=False)}
    for name, images in variants.items():
        per_class = [spectral_fd(reals[real_labels == c], images[labels[~first] == c]) for c in range(len(PROMPTS))]
        print(f"{name:28s} spectral FD {spectral_fd(half_reals, images):8.2f} "
              f"(per class {', '.join(f'{v:.1f}' for v in per_class)})  "
              f"FD {frechet_distance(evaluator, half_reals, images):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
