"""Forward time of the multi-patch adapter on the testbed DiT (6 layers, width 128, 3x32x32), batch 16.

    pytest benchmarks/test_adapter_speed.py

pytest-benchmark's table gives each time in a group relative to the group's
fastest, all measured in the same run: in "forward by patch size" the ratios
of patch 2 and 4 to patch 8, in "base size" the wrapper's overhead over
calling the backbone itself.
"""

import copy

import pytest
import torch

from ddit.adapter import MultiPatchTransformer
from ddit.testbed.base_model import build_base_model

BATCH = 16


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


@pytest.mark.parametrize("size", [2, 4, 8])
def test_forward_by_patch_size(benchmark, model, inputs, size):
    benchmark.group = "forward by patch size"
    benchmark.extra_info["tokens"] = (32 // size) ** 2
    with torch.inference_mode():
        benchmark(model, **inputs, patch_size=size)


@pytest.mark.parametrize("path", ["backbone", "wrapper"])
def test_base_size(benchmark, backbone, model, inputs, path):
    benchmark.group = "base size"
    with torch.inference_mode():
        benchmark(backbone if path == "backbone" else model, **inputs)
