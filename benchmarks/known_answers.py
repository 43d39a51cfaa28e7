"""Every row's quality metrics on a finished ablation, and the metrics' known answers on its baseline.

    python benchmarks/known_answers.py runs/benchmark-targets-HASH

The known answers (issue 13): the baseline's images split into two seed sets of the same
classes (a metric's spread is how far apart their values are), then the second set with
Gaussian noise of std 0.05 added, and blurred with a 3x3 box. A metric the report can lead
with must get worse under both by more than that spread, and a set against itself must be
at the floor (0).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddit.ablate.runner import load_images
from ddit.testbed.data import PROMPTS, make_dataset
from ddit.testbed.evaluate import REAL_SEEDS, adherence, balanced_labels
from ddit.testbed.evaluator import frechet_distance, load_evaluator
from ddit.testbed.spectrum import spectral_fd


def main(out: Path) -> None:
    evaluator = load_evaluator()
    metrics = {"FD": lambda a, b: frechet_distance(evaluator, a, b), "spectral FD": spectral_fd}
    config = json.loads((out / "config.json").read_text())
    n = config["num_per_class"] * len(PROMPTS)
    labels = balanced_labels(n)
    reals, real_labels = make_dataset(n, REAL_SEEDS[0])
    other = make_dataset(n, REAL_SEEDS[1])[0]
    print(f"{n} images per row; real-vs-real floor: "
          + ", ".join(f"{name} {metric(reals, other):.3g}" for name, metric in metrics.items()))
    for key in config["rows"]:
        images = load_images(out, key)
        print(f"{key:34s} " + "  ".join(f"{name} {metric(reals, images):8.3f}" for name, metric in metrics.items())
              + f"  adherence {adherence(evaluator, images, labels)['adherence']:.3f}")

    base = load_images(out, "baseline")
    first = (torch.arange(n) // len(PROMPTS)) % 2 == 0  # two halves, each with every class
    half_reals, second = reals[: n // 2], base[~first]
    variants = {"first half": base[first], "second half": second,
                "second + noise 0.05": second + 0.05 * torch.randn(second.shape,
                                                                  generator=torch.Generator().manual_seed(0)),
                "second, 3x3 box blur": F.avg_pool2d(second, 3, stride=1, padding=1, count_include_pad=False)}
    print("\nknown answers on the baseline's images (per class: " + ", ".join(PROMPTS) + ")")
    for name, metric in metrics.items():
        values = {}
        for variant, images in variants.items():
            values[variant] = metric(half_reals, images)
            per_class = [metric(reals[real_labels == c], images[labels[~first] == c]) for c in range(len(PROMPTS))]
            print(f"  {name:12s} {variant:22s} {values[variant]:8.3f}  (per class "
                  f"{', '.join(f'{v:.3g}' for v in per_class)})")
        spread = abs(values["first half"] - values["second half"])
        worse = {v: values[v] - values["second half"] for v in ("second + noise 0.05", "second, 3x3 box blur")}
        verdict = "passes" if min(worse.values()) > spread else "FAILS"
        print(f"  {name}: spread {spread:.3g}; noise worsens it by {worse['second + noise 0.05']:.3g}, blur by "
              f"{worse['second, 3x3 box blur']:.3g}; baseline against itself {metric(base, base):.2g}: {verdict}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
