"""Both training commands run, checkpoint, and resume to exactly the same state."""

import json

import pytest
import torch
from conftest import TINY_DIT
from safetensors.torch import load_file

from ddit.checkpoint import Checkpointer, CheckpointError, TrainingRun
from ddit.testbed.evaluator import EvaluatorTrainConfig, load_evaluator, train_evaluator
from ddit.testbed.train_base import BaseTrainConfig, train_base


def tiny_base(steps):
    return BaseTrainConfig(steps=steps, batch_size=4, num_images=32, warmup=2, model_overrides=TINY_DIT)


def tiny_evaluator(steps):
    return EvaluatorTrainConfig(steps=steps, batch_size=8, num_images=32, num_heldout=16)


def interrupt_after(monkeypatch, steps):
    """Make a training run die like a killed process after ``steps`` steps."""
    log = TrainingRun.log

    def dying_log(self, loss):
        log(self, loss)
        if len(self.state["losses"]) == steps:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "log", dying_log)


def test_base_training_resumes_to_the_same_state(tmp_path, monkeypatch):
    train_base(tmp_path / "straight", tiny_base(4), progress=False)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train_base(tmp_path / "split", tiny_base(4), checkpoint_minutes=0, progress=False)
    export = train_base(tmp_path / "split", tiny_base(4), resume=True, progress=False)

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert split["state"]["step"] == 4 and len(split["state"]["losses"]) == 4
    assert split["state"]["losses"] == straight["state"]["losses"]
    for name in straight["model"]:
        assert torch.equal(split["model"][name], straight["model"][name]), name
    exported = load_file(export / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in exported.values())
    assert json.loads((tmp_path / "split" / "training.json").read_text())["steps"] == 4


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    train_base(tmp_path, tiny_base(1), progress=False)
    other = BaseTrainConfig(steps=2, batch_size=8, num_images=32, warmup=2, model_overrides=TINY_DIT)
    with pytest.raises(CheckpointError, match="only --steps may change"):
        train_base(tmp_path, other, resume=True, progress=False)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="without --resume"):
        train_base(tmp_path, tiny_base(1), resume=True, progress=False)


def test_more_steps_continue_a_finished_run(tmp_path):
    train_base(tmp_path / "straight", tiny_base(3), progress=False)
    train_base(tmp_path / "more", tiny_base(2), progress=False)
    train_base(tmp_path / "more", tiny_base(3), resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=False)
    assert a["state"]["losses"] == b["state"]["losses"]


def test_evaluator_training_resumes_to_the_same_state(tmp_path, monkeypatch):
    train_evaluator(tmp_path / "straight", tiny_evaluator(4), progress=False)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train_evaluator(tmp_path / "split", tiny_evaluator(4), checkpoint_minutes=0, progress=False)
    report = train_evaluator(tmp_path / "split", tiny_evaluator(4), resume=True, progress=False)

    a = load_evaluator(tmp_path / "straight").state_dict()
    b = load_evaluator(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 0.0 <= report["heldout_accuracy"] <= 1.0


def test_one_clock_decides_when_processes_checkpoint_together():
    """``agree`` overrides this process's own clock: where FSDP gathers shards, all save or none."""
    saved = []
    never_due_here = Checkpointer(lambda: saved.append("main said so"), minutes=60, agree=lambda due: True)
    never_due_here.tick()
    due_here = Checkpointer(lambda: saved.append("own clock"), minutes=0, agree=lambda due: False)
    due_here.tick()
    assert saved == ["main said so"]
