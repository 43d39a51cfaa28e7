"""Distillation (DDiT Eq. 1) on a tiny testbed DiT and a few testbed images."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import ddit.distill
from ddit.adapter import MultiPatchTransformer
from ddit.checkpoint import CheckpointError
from ddit.distill import (DistillationLoss, DistillConfig, LatentDataset, NoisedLatents, distill,
                          sampler_sigmas)
from ddit.testbed.base_model import build_base_model
from ddit.testbed.data import make_dataset

CONFIG = DistillConfig(steps=4, batch_size=4, lr=3e-3, num_inference_steps=10)


def data_set():
    images, labels = make_dataset(16, seed=0)
    return LatentDataset(images, class_labels=labels)


@pytest.fixture(scope="module")
def data():
    return data_set()


def adapter():
    """A tiny testbed DiT with random (not zero) output layers, so the teacher says something, wrapped."""
    torch.manual_seed(0)
    model = build_base_model(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return MultiPatchTransformer(model)


def run(data, out, config=CONFIG, **kw):
    model = adapter()
    return model, distill(model, data, out, config, progress=False, **kw)


def test_trains_only_the_adapter_at_the_samplers_noise_levels(data, tmp_path, monkeypatch):
    timesteps, forward = [], ddit.distill.DistillationLoss.forward

    def spy(self, z_t, kwargs):
        timesteps.append(kwargs["timestep"])
        return forward(self, z_t, kwargs)

    monkeypatch.setattr(ddit.distill.DistillationLoss, "forward", spy)
    model = adapter()
    frozen = {n: p.clone() for n, p in model.backbone.named_parameters() if ".lora_" not in n}
    new = {n: v.clone() for n, v in model.adapter_state_dict().items()}
    config = DistillConfig(steps=12, batch_size=4, lr=3e-3, num_inference_steps=10)
    export = distill(model, data, tmp_path, config, progress=False)

    assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.named_parameters() if n in frozen)
    assert all(not torch.equal(v, new[n]) for n, v in model.adapter_state_dict().items() if "lora_A" not in n)
    sigmas = sampler_sigmas(10)
    assert len(timesteps) == 12 and all(torch.isin(t / 1000, sigmas).all() for t in timesteps)
    losses = torch.tensor(json.loads((tmp_path / "distill.json").read_text())["losses"])  # (steps, sizes)
    assert losses.shape == (12, 2) and (losses[-3:].mean(0) < losses[:3].mean(0)).all()
    loaded = MultiPatchTransformer.from_pretrained(adapter().detach(), export)  # the same stock backbone
    assert all(torch.equal(v, loaded.adapter_state_dict()[n]) for n, v in model.adapter_state_dict().items())


def test_resumed_run_reproduces_an_uninterrupted_one(data, tmp_path):
    straight, _ = run(data, tmp_path / "straight")
    run(data, tmp_path / "resumed", DistillConfig(**{**CONFIG.__dict__, "steps": 2}))
    resumed, _ = run(data, tmp_path / "resumed", resume=True)
    for name, value in straight.adapter_state_dict().items():
        assert torch.equal(value, resumed.adapter_state_dict()[name]), name


def test_resume_refuses_other_settings(data, tmp_path):
    run(data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "steps": 1}))
    with pytest.raises(CheckpointError, match="only --steps may change"):
        run(data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "lr": 1e-4}), resume=True)


def test_resume_refuses_other_latents(data, tmp_path):
    """A --latents file edited between runs: same count and shapes, other values."""
    run(data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "steps": 1}))
    edited = LatentDataset(data.latents.flip(-1), **data.conditioning)
    with pytest.raises(CheckpointError, match="run on other inputs: data"):
        run(edited, tmp_path, resume=True)
    run(data_set(), tmp_path, resume=True)  # the same values, loaded again: resumes
    labels = data.conditioning["class_labels"]
    both = LatentDataset(data.latents, class_labels=labels, mask=labels > 0)
    assert both.fingerprint() == LatentDataset(data.latents, mask=labels > 0, class_labels=labels).fingerprint()
    made = LatentDataset(data.latents, class_labels=labels, identity="made so, seed 0")  # named by how it was made
    assert made.fingerprint() == "made so, seed 0"


def test_gradient_checkpointing_gives_every_size_its_own_gradients(data):
    """The loss runs every coarse size's forward before one backward: a block recomputed in the backward must
    run with the LoRA of the size that ran it, not the last size's (which has the same shapes)."""
    def gradients(checkpointing):
        model = adapter()
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as after some training: LoRA that changes the blocks' outputs
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            model.enable_gradient_checkpointing()
        z, kwargs = NoisedLatents(data, sampler_sigmas(10), 1000.0).draw(torch.Generator().manual_seed(0), 4)
        DistillationLoss(model, model.patch_sizes[1:])(z, kwargs).sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if ".lora_" in name}

    plain, checkpointed = gradients(False), gradients(True)
    for size in (4, 8):
        names = [name for name in plain if f".patch{size}." in name]
        assert names and all(plain[n].abs().sum() > 0 for n in names if "lora_A" in n)
        assert all(torch.allclose(checkpointed[n], plain[n], rtol=1e-4, atol=1e-7) for n in names), size


def test_resume_refuses_another_adapter_layout(data, tmp_path):
    run(data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "steps": 1}))
    torch.manual_seed(0)
    wider = MultiPatchTransformer(build_base_model(num_layers=2, num_attention_heads=2, attention_head_dim=8), rank=4)
    with pytest.raises(CheckpointError, match="resume with the same --sizes, --rank and --shared-lora"):
        distill(wider, data, tmp_path, CONFIG, progress=False, resume=True)


def test_training_some_sizes_leaves_the_others_untouched_and_out_of_the_gradients(data, tmp_path):
    model = adapter()
    before = {name: v.clone() for name, v in model.adapter_state_dict().items()}
    distill(model, data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "patch_sizes": (4,)}), progress=False)
    after = model.adapter_state_dict()
    moved = {name for name in after if not torch.equal(after[name], before[name])}
    assert moved and all(".4." in name or ".patch4." in name for name in moved)
    assert any(".patch4." in name and "lora_B" in name for name in moved)
    assert not any(p.requires_grad for p in model.trainable_parameters([8]))  # DDP skips what does not train
    with pytest.raises(ValueError, match=r"patch sizes \[6\] are not this adapter's coarse sizes"):
        distill(model, data, tmp_path, DistillConfig(**{**CONFIG.__dict__, "patch_sizes": (6,)}), progress=False)


def test_an_accelerate_config_with_mixed_precision_is_refused(data, tmp_path):
    accelerator = SimpleNamespace(mixed_precision="bf16")  # what accelerate launch with such a config gives
    with pytest.raises(ValueError, match="mixed_precision: bf16.*set mixed_precision: no"):
        distill(adapter(), data, tmp_path, CONFIG, progress=False, accelerator=accelerator)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_sampler_sigmas_are_the_noise_levels_the_sampler_visits():
    sigmas = sampler_sigmas(10)
    assert len(sigmas) == 10 and sigmas[0] == 1.0 and (sigmas > 0).all() and (sigmas.diff() < 0).all()


DDP_SCRIPT = """
import sys, torch
from accelerate import PartialState
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from test_distill import CONFIG, adapter, data_set
from ddit.distill import distill

model = adapter()
distill(model, data_set(), sys.argv[1], CONFIG, progress=False)
state = PartialState()
save_file({{k: v.contiguous() for k, v in model.adapter_state_dict().items()}}, f"{{sys.argv[1]}}/rank{{state.process_index}}.safetensors")
state.destroy_process_group()
"""


FSDP_SCRIPT = """
import sys
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
sys.path.insert(0, {tests!r})
from test_distill import CONFIG, adapter, data_set
from ddit.distill import DistillConfig, distill

# many units, each holding LoRA weights, and each called once per patch size in a step
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                        transformer_cls_names_to_wrap=["Attention", "FeedForward"])
accelerator = Accelerator(fsdp_plugin=plugin)
# accelerate turns FSDP on only for accelerators; these CPU processes take the same path (as
# accelerate does on a GPU, the process state learns it too, or the next AcceleratorState() forgets it)
accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
PartialState._shared_state["distributed_type"] = DistributedType.FSDP
out = sys.argv[1]
distill(adapter(), data_set(), out + "/straight", CONFIG, progress=False, accelerator=accelerator)
half = DistillConfig(**{{**CONFIG.__dict__, "steps": 2}})
for config, resume in ((half, False), (CONFIG, True)):  # every step a checkpoint, gathered from both ranks
    distill(adapter(), data_set(), out + "/resumed", config, progress=False, accelerator=accelerator,
            resume=resume, checkpoint_minutes=0)
PartialState().destroy_process_group()
"""


#: What a rank prints when a native thread of the CPU process group aborts it (std::terminate): seen once in a
#: fresh-clone CI run of the FSDP test (2026-12-04), not reproduced in reruns; such a run starts over, once.
NATIVE_ABORT = "terminate called without an active exception"


def launch(script: str, tmp_path: Path, out: Path) -> None:
    """``accelerate launch`` with two CPU processes (gloo); once more from scratch after a native abort."""
    path = tmp_path / "script.py"
    path.write_text(script.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(path), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and NATIVE_ABORT in done.stderr:
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory) -> Path:
    """A two-process DDP distillation: its output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    launch(DDP_SCRIPT, tmp, tmp / "two")
    return tmp / "two"


def test_two_processes_under_accelerate_launch_train_one_adapter(data_parallel, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo): each rank draws its own batches, the
    gradients are averaged, so both end with the same weights, unlike a one-process run."""
    ranks = [load_file(data_parallel / f"rank{i}.safetensors") for i in (0, 1)]
    model, _ = run(data_set(), tmp_path / "one")
    alone = model.adapter_state_dict()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in alone)
    assert not all(torch.allclose(ranks[0][k], alone[k]) for k in alone)
    assert json.loads((data_parallel / "distill.json").read_text())["steps"] == CONFIG.steps


def test_fsdp_trains_what_data_parallel_trains_and_resumes_from_whole_checkpoints(data_parallel, tmp_path):
    """accelerate's FSDP (version 2) on two CPU processes: the shards train the same adapter as DDP, the
    saved adapter is whole, a run checkpointed at every step (both ranks gathering together) and
    resumed ends where the uninterrupted one does, optimiser state included, and one process can
    go on from its checkpoint."""
    launch(FSDP_SCRIPT, tmp_path, tmp_path / "fsdp")
    ddp = load_file(data_parallel / "adapter" / "multipatch.safetensors")
    straight = load_file(tmp_path / "fsdp" / "straight" / "adapter" / "multipatch.safetensors")
    resumed = load_file(tmp_path / "fsdp" / "resumed" / "adapter" / "multipatch.safetensors")
    initial = adapter().adapter_state_dict()
    assert straight.keys() == ddp.keys() == initial.keys()
    assert not all(torch.allclose(straight[k], initial[k]) for k in initial)
    for k in ddp:
        assert straight[k].shape == initial[k].shape, k
        torch.testing.assert_close(straight[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-7, msg=k)
    checkpoint = torch.load(tmp_path / "fsdp" / "resumed" / "checkpoint.pt", weights_only=False)
    assert checkpoint["state"]["step"] == CONFIG.steps
    moments = [s["exp_avg"].shape for s in checkpoint["optimizer"]["state"].values()]
    assert moments == [v.shape for v in initial.values()]
    more = DistillConfig(**{**CONFIG.__dict__, "steps": 5})
    with pytest.warns(UserWarning, match="trained on 2 processes and goes on with 1"):
        run(data_set(), tmp_path / "fsdp" / "resumed", more, resume=True)  # whole checkpoints: on without FSDP
    record = json.loads((tmp_path / "fsdp" / "resumed" / "distill.json").read_text())
    assert record["steps"] == 5 and record["processes"] == [2, 1]


def test_fsdp_version_1_is_refused_before_training(data, tmp_path):
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, mixed_precision="no")
    with pytest.raises(ValueError, match="FSDP version 2 only .* fsdp_version: 2"):
        run(data, tmp_path, accelerator=fsdp1)
    assert not any(tmp_path.iterdir())
