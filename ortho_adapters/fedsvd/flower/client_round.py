"""One client round of a federated run: local training from the global state, DP-SGD, a run-long accountant.

The client's accountant history lives in a node-local :class:`~.ledger.PrivacyLedger` when the node has
``state-dir`` in its node config (it then survives SuperNode restarts and accumulates over every run of the
same ``experiment_id``), else in ``context.state`` (kept by Flower across the rounds of one run, in memory).
Used by both reply formats: the plain one (:mod:`.client_app`) and SecAgg+ (:mod:`.secagg_client`).
"""

from __future__ import annotations

import json
import zlib

from flwr.app import ConfigRecord, Context

from ..privacy import ClientPrivacy
from ..task import client_dataset, frozen_key, loss_of, tokenized_splits
from ..training import local_train
from .ledger import PrivacyLedger
from .settings import FedSettings
from .state import adapter_state, cached_model, load_adapter_state

PRIVACY_STATE = "fedsvd-privacy"


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (simulation, or ``--node-config``)."""
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def ledger_of(context: Context, settings: FedSettings) -> PrivacyLedger | None:
    """The node-local ledger (node config ``state-dir``), or ``None`` when the node has no state dir."""
    state_dir = context.node_config.get("state-dir")
    if not state_dir:
        return None
    return PrivacyLedger(str(state_dir), settings.experiment_id, partition_of(context)[0])


def load_privacy(context: Context, settings: FedSettings) -> ClientPrivacy | None:
    """This client's privacy state so far: from its ledger on disk, else from the run's ``context.state``."""
    ledger = ledger_of(context, settings)
    if ledger is not None:
        return ledger.load(settings.dp)
    if PRIVACY_STATE not in context.state:
        return None
    return ClientPrivacy.from_state(json.loads(context.state[PRIVACY_STATE]["json"]))


def save_privacy(context: Context, settings: FedSettings, privacy: ClientPrivacy) -> None:
    """Record the state before the round's reply leaves (atomically on disk with a ledger)."""
    ledger = ledger_of(context, settings)
    if ledger is not None:
        ledger.save(privacy)
    else:
        context.state[PRIVACY_STATE] = ConfigRecord({"json": json.dumps(privacy.state_dict())})


def round_seed(seed: int, partition: int, server_round: int) -> int:
    return zlib.crc32(f"{seed}/{partition}/{server_round}".encode())


def local_round(
    context: Context, settings: FedSettings, server_round: int, global_state: dict
) -> tuple[dict, dict, ClientPrivacy | None]:
    """One round of local training from ``global_state``: ``(sent tensors, metrics, privacy or None)``.

    The sent tensors are the arm's trainable ones (never a frozen tensor); under DP the privacy state is
    recorded (ledger or ``context.state``) before this returns, so before the reply can leave.
    """
    partition, num_partitions = partition_of(context)
    train_set, _ = tokenized_splits(settings.n_train, settings.n_eval, settings.max_length, settings.seed)
    dataset = client_dataset(
        train_set, partition, num_partitions, settings.dirichlet_alpha, settings.seed, settings.batch_size
    )
    model = cached_model(settings.spec)
    load_adapter_state(model, global_state)

    privacy = None
    trained = True
    if settings.dp is not None:
        privacy = load_privacy(context, settings) or ClientPrivacy.create(
            settings.dp, len(dataset), settings.batch_size, settings.planned_steps
        )
        trained = privacy.can_train(settings.local_steps)
    losses: list[float] = []
    if trained:
        losses = local_train(
            model,
            dataset,
            settings.local_steps,
            settings.batch_size,
            settings.lr,
            loss_of,
            seed=round_seed(settings.seed, partition, server_round),
            privacy=privacy,
            momentum=settings.momentum,
        )
    if privacy is not None:
        (privacy.rounds if trained else privacy.skipped).append(server_round)
        save_privacy(context, settings, privacy)

    sent = {k: v for k, v in adapter_state(model).items() if not frozen_key(settings.arm, k)}
    finite = [x for x in losses if x == x]
    metrics = {
        "num-examples": len(dataset),
        "partition-id": partition,
        "trained": int(trained),
        "train-loss": sum(finite) / len(finite) if finite else 0.0,
    }
    return sent, metrics, privacy
