"""Server checkpoints of a federated run: the global adapter state after every round, and resuming from it.

Flower 1.42 has no checkpoint / resume of a run. With ``checkpoint_dir`` set, the ServerApp writes after
every round (once the round's aggregate is evaluated):

* ``global-round-<r>.safetensors``: the global adapter state (safetensors; loading never unpickles);
* ``progress.json``: the last finished round, that file's name, the run's per-round log, per-client
  bookkeeping and accuracies, and the settings that define the experiment.

Both are written atomically (:func:`.durable.write_atomically`), the state first, so ``progress.json`` always
names a complete state file. A new run with the same settings and ``checkpoint_dir`` resumes after the
last finished round, with the same round numbers (client sampling and client seeds depend on them), so
without DP it ends with the same global state as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .durable import write_atomically

PROGRESS = "progress.json"
# settings that do not change what the run computes: they may differ between a run and its resume
_NOT_IDENTITY = ("rounds", "report", "progress", "node_wait_s", "checkpoint_dir")


@dataclass
class Progress:
    """What a checkpoint holds besides the global state."""

    server_round: int
    round_log: dict[int, dict[str, Any]]
    clients: dict[int, dict[str, Any]]
    accuracies: dict[int, float]


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that define the experiment (a resume must match them)."""
    return {k: v for k, v in sorted(settings.items()) if k not in _NOT_IDENTITY}


class ServerCheckpoint:
    """The checkpoints of one experiment in ``folder``."""

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.settings = identity(settings)

    def save(self, state: dict[str, torch.Tensor], progress: Progress) -> None:
        """Write round ``progress.server_round``'s global state, then the progress naming it."""
        name = f"global-round-{progress.server_round}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        write_atomically(self.folder / name, lambda path: save_file(tensors, path))
        record = {
            "server_round": progress.server_round,
            "state_file": name,
            "settings": self.settings,
            "round_log": {str(k): v for k, v in progress.round_log.items()},
            "clients": {str(k): v for k, v in progress.clients.items()},
            "accuracies": {str(k): v for k, v in progress.accuracies.items()},
        }
        write_atomically(self.folder / PROGRESS, lambda path: Path(path).write_text(json.dumps(record)))
        for old in self.folder.glob("global-round-*.safetensors"):
            if old.name != name:
                old.unlink()

    def load(self) -> Optional[tuple[dict[str, torch.Tensor], Progress]]:
        """The last checkpoint, or ``None`` when there is none.

        Raises ``ValueError`` when it belongs to other settings (naming the fields that differ) or when its
        state file is missing.
        """
        path = self.folder / PROGRESS
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record["settings"] != self.settings:
            differ = sorted(
                k
                for k in set(record["settings"]) | set(self.settings)
                if record["settings"].get(k) != self.settings.get(k)
            )
            raise ValueError(
                f"checkpoint {path} is of another experiment (settings differ: {differ}); use another "
                "checkpoint_dir, or the same settings to resume"
            )
        state_path = self.folder / record["state_file"]
        if not state_path.exists():
            raise ValueError(f"checkpoint {path} names {state_path.name}, which is missing")
        progress = Progress(
            int(record["server_round"]),
            {int(k): v for k, v in record["round_log"].items()},
            {int(k): v for k, v in record["clients"].items()},
            {int(k): float(v) for k, v in record["accuracies"].items()},
        )
        return load_file(str(state_path)), progress
