"""A client's privacy ledger on node-local disk: its DP accountant history survives restarts and new runs.

Flower keeps ``Context.state`` per run and in memory on the SuperNode, so a restarted SuperNode, or a new
run of the same experiment, would start the client's epsilon at zero again. With ``--node-config
"state-dir=<dir>"`` the client keeps its :class:`~ortho_adapters.fedsvd.privacy.ClientPrivacy` in
``<dir>/privacy-ledger/<experiment-id>/partition-<p>.json`` instead, keyed by the run config's
``experiment_id``. The file is written atomically (:func:`.durable.write_atomically`)
after the round's steps are accounted and before the round's update leaves the client, so a crash leaves
either the old or the new ledger, never a partial one, and no update is ever sent that the ledger does
not count.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from ..privacy import ClientPrivacy, DPConfig
from .durable import write_atomically

LEDGER_DIR = "privacy-ledger"
_EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PrivacyLedger:
    """The ledger of one client (``partition``) in one experiment, under ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike, experiment_id: str, partition: int) -> None:
        if not _EXPERIMENT_ID.match(experiment_id):
            raise ValueError(
                f"experiment_id {experiment_id!r} is not a valid ledger key: use 1-128 letters, digits, '.', "
                "'_' or '-', starting with a letter or digit"
            )
        self.path = Path(state_dir) / LEDGER_DIR / experiment_id / f"partition-{int(partition)}.json"

    def load(self, expected: DPConfig) -> Optional[ClientPrivacy]:
        """The stored state, or ``None`` for a client that never trained in this experiment.

        Raises ``ValueError`` for an unreadable ledger, or one written under other DP settings than
        ``expected`` (its epsilon would not be comparable with the new target).
        """
        if not self.path.exists():
            return None
        try:
            privacy = ClientPrivacy.from_state(json.loads(self.path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"privacy ledger {self.path} is unreadable ({error}); the client refuses to train rather "
                "than start its epsilon at zero. Restore the file, or use a new experiment_id for a new "
                "experiment"
            ) from error
        if privacy.config != expected:
            raise ValueError(
                f"privacy ledger {self.path} was written with {privacy.config}, this run asks for "
                f"{expected}: one experiment keeps its DP settings (use a new experiment_id for new ones)"
            )
        return privacy

    def save(self, privacy: ClientPrivacy) -> None:
        """Write ``privacy`` atomically (see the module docstring)."""
        text = json.dumps(privacy.state_dict())
        write_atomically(self.path, lambda temporary: Path(temporary).write_text(text))
