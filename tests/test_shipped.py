"""The models that ship inside the package load and work."""

import json

import torch

from ddit.testbed.base_model import SHIPPED_BASE, generate, load_base_model
from ddit.testbed.data import PROMPTS, make_dataset
from ddit.testbed.evaluator import SHIPPED_EVALUATOR, accuracy, load_evaluator


def test_base_model_loads_and_a_sampling_step_runs():
    model = load_base_model()
    assert sum(p.numel() for p in model.parameters()) > 2_000_000
    images = generate(model, torch.arange(len(PROMPTS)), steps=1, guidance=2.0).images
    assert images.shape == (len(PROMPTS), 3, 32, 32)
    assert torch.isfinite(images).all()
    assert (SHIPPED_BASE / "diffusion_pytorch_model.safetensors").stat().st_size <= 10 * 2**20


def test_evaluator_recognises_held_out_images():
    images, labels = make_dataset(400, seed=4242)
    assert accuracy(load_evaluator(), images, labels) >= 0.98
    assert json.loads((SHIPPED_EVALUATOR / "evaluator.json").read_text())["heldout_accuracy"] >= 0.98
    assert (SHIPPED_EVALUATOR / "evaluator.safetensors").stat().st_size <= 2 * 2**20
