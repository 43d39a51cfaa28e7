"""Training runs that survive interruption.

A checkpoint is one ``torch.save`` file written atomically (temporary file,
then rename), so a run killed mid-write keeps its previous checkpoint.
``Checkpointer`` decides when to write: every few minutes and at the end;
``TrainingRun`` wraps a whole resumable training loop around them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used as it is."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file or nothing: a kill mid-write leaves the old file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}; run without --resume to start fresh") from None
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is damaged ({err}); delete it and run without --resume"
        ) from err


class Checkpointer:
    """Calls ``save`` every ``minutes`` of wall time; ``done()`` saves once more.

    ``agree(due) -> due``: where several processes save together (FSDP gathers the
    shards from all of them), one clock must decide for all, e.g. the main process's
    decision broadcast to the others; by default each process follows its own clock.
    """

    def __init__(self, save, minutes: float, agree: Callable[[bool], bool] | None = None):
        self.save, self.interval, self.agree = save, minutes * 60.0, agree
        self.last = time.monotonic()

    def tick(self) -> None:
        due = time.monotonic() - self.last >= self.interval
        if self.agree is not None:
            due = self.agree(due)
        if due:
            self.save()
            self.last = time.monotonic()

    def done(self) -> None:
        self.save()


class TrainingRun:
    """A resumable loop: named stateful objects, a config, a step counter and a loss log.

    ``steps()`` yields the step numbers still to run with a progress bar,
    checkpoints every few minutes and once at the end. Resuming checks that
    the config matches the checkpoint's (``steps`` alone may change), and so does
    ``identity``: what the config does not hold but the run depends on (its data, its
    process count), so two different runs are never mixed in one folder.
    """

    def __init__(self, path: str | os.PathLike, config, *, desc: str, minutes: float = 3.0,
                 progress: bool = True, writer: bool = True, agree: Callable[[bool], bool] | None = None,
                 identity: dict | None = None, **stateful):
        """``writer=False`` (every process but the main one of a multi-GPU run) never writes, but still
        takes the stateful objects' states, which may be collectives; ``agree``: see ``Checkpointer``."""
        self.path, self.config, self.desc, self.identity = Path(path), config, desc, identity or {}
        self.progress, self.writer = progress and writer, writer
        self.stateful = stateful
        self.state = {"step": 0, "losses": [], "seconds": 0.0}
        self.checkpointer = Checkpointer(self.save, minutes, agree)

    def save(self) -> None:
        states = {name: obj.state_dict() for name, obj in self.stateful.items()}
        if self.writer:
            save_checkpoint({"config": asdict(self.config), "identity": self.identity, "state": self.state,
                             **states}, self.path)

    def restore(self) -> None:
        ckpt = load_checkpoint(self.path)
        mine, saved = asdict(self.config), dict(ckpt["config"])
        if {**mine, "steps": None} != {**saved, "steps": None}:
            raise CheckpointError(
                f"{self.path} was written by a run with {saved}, not {mine}; resume with the "
                "same settings (only --steps may change) or write to another folder"
            )
        saved = ckpt.get("identity", {})  # checkpoints from before identities hold none
        changed = {k: (saved[k], v) for k, v in self.identity.items() if k in saved and saved[k] != v}
        if changed:
            raise CheckpointError(
                f"{self.path} was written by a run on other inputs: "
                + "; ".join(f"{k} {was} then, {now} now" for k, (was, now) in changed.items())
                + "; resume with the same ones or write to another folder")
        for name, obj in self.stateful.items():
            obj.load_state_dict(ckpt[name])
        self.state = ckpt["state"]

    def steps(self):
        total = self.config.steps
        started = time.monotonic() - self.state["seconds"]
        with tqdm(total=total, initial=self.state["step"], desc=self.desc, disable=not self.progress) as bar:
            while self.state["step"] < total:
                yield self.state["step"]
                self.state["step"] += 1
                self.state["seconds"] = time.monotonic() - started
                bar.update(1)
                recent = self.state["losses"][-50:]
                if recent:  # a loss may be a list (one per patch size): show the overall mean
                    bar.set_postfix(loss=f"{torch.tensor(recent, dtype=torch.float64).mean():.4f}")
                self.checkpointer.tick()
        self.checkpointer.done()

    def log(self, loss: float | list[float]) -> None:
        self.state["losses"].append(loss)
