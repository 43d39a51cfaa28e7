"""Forward time of the multi-patch adapter on the testbed DiT (6 layers, width 128, 3x32x32), batch 16.

    pytest benchmarks/test_adapter_speed.py

Each variant is a pytest-benchmark of its own; the last test turns their medians,
all measured in this one run, into the ratios that matter and checks the target:
the wrapper at the base size costs at most 3% over calling the backbone itself.
"""

import copy

import pytest
import torch

from ddit.adapter import MultiPatchTransformer
from ddit.testbed.base_model import build_base_model

BATCH = 16
MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def backbone():
    """The testbed DiT as it is, without the LoRA layers that wrapping injects."""
    torch.manual_seed(0)
    return build_base_model().eval()


@pytest.fixture(scope="module")
def model(backbone):
    return MultiPatchTransformer(copy.deepcopy(backbone)).eval()


@pytest.fixture(scope="module")
def inputs():
    return dict(hidden_states=torch.randn(BATCH, 3, 32, 32), timestep=torch.full((BATCH,), 500.0),
                class_labels=torch.arange(BATCH) % 4)


def measure(benchmark, name, fn, **kwargs):
    with torch.inference_mode():
        benchmark.pedantic(fn, kwargs=kwargs, rounds=20, warmup_rounds=2)
    MEDIANS[name] = benchmark.stats.stats.median


@pytest.mark.parametrize("size", [2, 4, 8])
def test_forward_by_patch_size(benchmark, model, inputs, size):
    benchmark.group = "forward by patch size"
    benchmark.extra_info["tokens"] = (32 // size) ** 2
    measure(benchmark, f"patch{size}", model, **inputs, patch_size=size)


@pytest.mark.parametrize("path", ["backbone", "wrapper"])
def test_base_size(benchmark, backbone, model, inputs, path):
    benchmark.group = "base size"
    measure(benchmark, path, backbone if path == "backbone" else model, **inputs)


def test_ratios(record_property):
    """Speed-ups of the coarse sizes and the wrapper's overhead, from this run's medians."""
    if len(MEDIANS) < 5:
        pytest.skip("run the whole file: the ratios need every variant of this run")
    ratios = {"patch2/patch4": MEDIANS["patch2"] / MEDIANS["patch4"],
              "patch2/patch8": MEDIANS["patch2"] / MEDIANS["patch8"],
              "wrapper/backbone": MEDIANS["wrapper"] / MEDIANS["backbone"]}
    for name, value in ratios.items():
        record_property(name, value)
        print(f"{name}: {value:.3f}")
    assert ratios["wrapper/backbone"] <= 1.03
