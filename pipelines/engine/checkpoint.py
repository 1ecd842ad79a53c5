"""Periodic training checkpoints for elastic recovery.

torchrun restarts every worker after a failure; each then resumes from the last complete
checkpoint.  Rank 0 writes (all ranks hold the same state), to a temporary file that is
fsynced and renamed into place, so a torn write is never seen under the final name.
Checkpoints are plain tensors and numbers, read back with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.common.home import atomic_file
from pipelines.engine import distributed


def on_host(state):
    """``state`` with every tensor on the CPU: a checkpoint resumes on either device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_host(v) for v in state)
    return state


class Checkpointer:
    """Checkpoints named ``<phase>.pt`` in ``folder``, every ``every`` steps."""

    def __init__(self, folder: Path, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        self.folder, self.every = Path(folder), every
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.pt"

    def load(self, phase: str) -> dict | None:
        path = self.path(phase)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def save(self, phase: str, state: dict) -> None:
        if distributed.world().is_main:
            with atomic_file(self.path(phase), "wb") as fh:
                torch.save(on_host(state), fh)
            print(f"checkpoint {phase} step {state['step']}", flush=True)
