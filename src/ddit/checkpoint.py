"""Training checkpoints that survive interruption.

A checkpoint is one ``torch.save`` file written atomically (temporary file,
then rename), so a run killed mid-write keeps its previous checkpoint.
``Checkpointer`` decides when to write: every few minutes and at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used as it is."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}; run without --resume to start fresh") from None
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is damaged ({err}); delete it and run without --resume"
        ) from err


class Checkpointer:
    """Calls ``save`` every ``minutes`` of wall time; ``done()`` saves once more."""

    def __init__(self, save, minutes: float):
        self.save, self.interval = save, minutes * 60.0
        self.last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.save()
            self.last = time.monotonic()

    def done(self) -> None:
        self.save()
