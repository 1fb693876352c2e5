"""Flower ``ServerApp``: FedSVD's server step (or a control arm's average) as a ``FedAvg`` subclass.

Each round the strategy samples ``clients_per_round`` of the connected nodes (seeded), sends them the full
global adapter state and the settings, validates every reply (a malformed or non-finite update, or one that
touches a frozen tensor, is rejected with an error naming the client and the tensor) and aggregates the
replies of the clients that trained: FedSVD = :func:`ortho_adapters.fedsvd.aggregate` (average ``B``, SVD of
``B_avg A``), FFA-LoRA = average ``B`` (``A`` fixed), FedAvg-LoRA = average ``A`` and ``B``. After every round
the global adapter is evaluated on the held-out split; the run's JSON report records per-round accuracy
and, per client, the rounds it trained and its privacy accounting.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..task import accuracy, frozen_key, server_step, tokenized_splits
from .checkpoint import Progress, ServerCheckpoint
from .settings import FedSettings
from .state import cached_model, initial_state, load_adapter_state


class FedSVDStrategy(FedAvg):
    """Seeded client sampling, validated aggregation with the arm's server step, per-client bookkeeping."""

    def __init__(self, settings: FedSettings, global_state: dict[str, torch.Tensor], round_offset: int = 0):
        super().__init__(
            fraction_train=settings.clients_per_round / settings.num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=settings.clients_per_round,
            min_available_nodes=settings.num_clients,
        )
        self.settings = settings
        self.global_state = {k: v.clone() for k, v in global_state.items()}
        self.sent_keys = sorted(k for k in global_state if not frozen_key(settings.arm, k))
        self.round_log: dict[int, dict[str, Any]] = {}
        self.clients: dict[int, dict[str, Any]] = {}
        self.node_of: Optional[dict[int, int]] = None
        # rounds already finished before this run (a resume): Flower counts from 1 again, the run goes on
        # with the experiment's round numbers (client sampling and client seeds depend on them)
        self.round_offset = round_offset

    def partitions(self, grid: Grid) -> dict[int, int]:
        """``partition-id -> node id`` of all nodes (asked once with a QUERY message, once all connected).

        A node that does not answer (e.g. a SuperNode restarting: the SuperLink reports it unavailable until
        its next heartbeat) is asked again every 2 s until ``node_wait_s`` has passed."""
        if self.node_of is not None:
            return self.node_of
        deadline = time.monotonic() + self.settings.node_wait_s
        while len(nodes := sorted(grid.get_node_ids())) < self.settings.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.settings.num_clients} nodes connected")
            time.sleep(1.0)
        node_of: dict[int, int] = {}
        pending = list(nodes)
        while pending:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in pending]
            replies = list(grid.send_and_receive(queries, timeout=self.settings.node_wait_s))
            errors = [reply.error.reason for reply in replies if reply.has_error()]
            for reply in replies:
                if not reply.has_error():
                    node_of[int(reply.content["metrics"]["partition-id"])] = reply.metadata.src_node_id
            pending = [n for n in pending if n not in node_of.values()]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"nodes {pending} did not answer: {errors}")
            if pending:
                log(INFO, "waiting for node(s) %s to answer: %s", pending, errors)
                time.sleep(2.0)
        if sorted(node_of) != list(range(self.settings.num_clients)):
            raise RuntimeError(
                f"expected partitions 0..{self.settings.num_clients - 1}, got {sorted(node_of)}"
            )
        self.node_of = node_of
        return node_of

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """Node ids of ``clients_per_round`` partitions drawn with a per-round seed: every arm of an
        experiment trains the same clients in the same rounds (a paired comparison)."""
        node_of = self.partitions(grid)
        rng = random.Random(self.settings.seed * 100_003 + server_round)
        chosen = sorted(rng.sample(sorted(node_of), self.settings.clients_per_round))
        self.round_log[server_round] = {"round": server_round, "clients_sampled": chosen}
        return [node_of[p] for p in chosen]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global state (``A`` and ``B``) and the settings to the sampled nodes."""
        server_round += self.round_offset
        self.global_state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        record = ConfigRecord({**self.settings.to_record(), "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": record})
        nodes = self.sample(grid, server_round)
        return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def record_reply(self, server_round: int, partition: int, metrics, privacy_json) -> bool:
        """Book one client's reply (round trained or refused, privacy report); return whether it trained."""
        info = self.clients.setdefault(partition, {"rounds_trained": [], "rounds_refused": []})
        if privacy_json is not None:
            info["privacy"] = json.loads(privacy_json)
        trained = bool(int(metrics["trained"]))
        info["rounds_trained" if trained else "rounds_refused"].append(server_round)
        return trained

    def finish_round(
        self,
        server_round: int,
        states: list[dict[str, torch.Tensor]],
        counts: list[int],
        names: list[str],
        losses: list[float],
        refused: list[int],
        trained: Optional[int] = None,
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Apply the arm's server step to ``states`` (weights ``counts``) and log the round; ``None`` when
        no client trained. ``trained``: how many clients trained, when ``states`` is one secure aggregate."""
        entry = self.round_log[server_round]
        entry.update(
            {"clients_trained": len(states) if trained is None else trained, "clients_refused": refused}
        )
        if not states:
            log(
                INFO,
                "round %s: no client trained (privacy budgets spent); global state unchanged",
                server_round,
            )
            return None, None
        new_state = server_step(self.settings.arm)(self.global_state, states, counts, client_names=names)
        self.global_state = new_state
        mean_loss = sum(c * x for c, x in zip(counts, losses)) / sum(counts)
        entry["train_loss"] = mean_loss
        return ArrayRecord.from_torch_state_dict(new_state), MetricRecord({"train-loss": mean_loss})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Validate the replies and apply the arm's server step to those that trained."""
        server_round += self.round_offset
        states, counts, names, losses = [], [], [], []
        errors, refused = [], []
        for msg in replies:
            if msg.has_error():
                errors.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            metrics = msg.content["metrics"]
            partition = int(metrics["partition-id"])
            name = f"client {partition} (node {msg.metadata.src_node_id})"
            privacy = msg.content["privacy"]["json"] if "privacy" in msg.content else None
            if not self.record_reply(server_round, partition, metrics, privacy):
                refused.append(partition)
                continue
            sent = msg.content["arrays"].to_torch_state_dict()
            if sorted(sent) != self.sent_keys:
                extra, missing = (
                    sorted(set(sent) - set(self.sent_keys)),
                    sorted(set(self.sent_keys) - set(sent)),
                )
                raise ValueError(
                    f"{name}: sent tensors differ from the trainable ones (missing {missing}, "
                    f"unexpected {extra})"
                )
            states.append({**self.global_state, **sent})
            counts.append(int(metrics["num-examples"]))
            names.append(name)
            losses.append(float(metrics["train-loss"]))
        if errors:
            raise RuntimeError(f"round {server_round}: client failures: {errors}")
        return self.finish_round(server_round, states, counts, names, losses, refused)


def run_server(grid: Grid, settings: FedSettings, context: Optional[Context] = None) -> dict[str, Any]:
    """Run ``settings.rounds`` rounds on ``grid`` (SecAgg+ rounds with ``secure_aggregation``), print
    per-round progress, write and return the report. ``context``: the ServerApp's (a secure run wraps it)."""
    model = cached_model(settings.spec)
    initial = initial_state(settings.spec)
    _, test_set = tokenized_splits(settings.n_train, settings.n_eval, settings.max_length, settings.seed)
    checkpoint = (
        ServerCheckpoint(settings.checkpoint_dir, settings.to_record()) if settings.checkpoint_dir else None
    )
    resumed = checkpoint.load() if checkpoint is not None else None
    accuracies: dict[int, float] = {}
    if resumed is None:
        strategy = FedSVDStrategy(settings, initial)
    else:
        state, progress = resumed
        load_adapter_state(model, state)  # checks that the saved keys are this arm's
        strategy = FedSVDStrategy(settings, state, round_offset=progress.server_round)
        strategy.round_log, strategy.clients = progress.round_log, progress.clients
        accuracies.update(progress.accuracies)
        initial = state
        log(INFO, "resuming from %s after round %s", settings.checkpoint_dir, progress.server_round)
    label = f"{settings.arm} eps={settings.epsilon or 'none'}"
    start = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += strategy.round_offset
        state = arrays.to_torch_state_dict()
        load_adapter_state(model, state)
        acc = accuracy(model, test_set)
        accuracies[server_round] = acc
        if checkpoint is not None and server_round > strategy.round_offset:
            checkpoint.save(state, Progress(server_round, strategy.round_log, strategy.clients, accuracies))
        if settings.progress:
            entry = strategy.round_log.get(server_round, {})
            eps = [c["privacy"]["epsilon"] for c in strategy.clients.values() if "privacy" in c]
            extra = f"  max eps {max(eps):.2f}" if eps else ""
            trained = (
                f"  trained {entry.get('clients_trained', 0)}/{len(entry.get('clients_sampled', []))}"
                if entry
                else ""
            )
            print(
                f"[{label}] round {server_round}/{settings.rounds}  held-out acc {acc:.4f}{trained}{extra}  "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return MetricRecord({"accuracy": acc})

    remaining = settings.rounds - strategy.round_offset
    if remaining < 0:
        raise ValueError(
            f"checkpoint in {settings.checkpoint_dir} is after round {strategy.round_offset}, beyond rounds="
            f"{settings.rounds}"
        )
    if remaining and settings.secure_aggregation:
        from .secagg_server import run_secure_rounds

        run_secure_rounds(grid, strategy, remaining, evaluate, context)
    elif remaining:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord.from_torch_state_dict(initial),
            num_rounds=remaining,
            evaluate_fn=evaluate,
        )
    report = build_report(settings, strategy, accuracies, time.perf_counter() - start)
    if settings.report:
        path = Path(settings.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report


def build_report(
    settings: FedSettings, strategy: FedSVDStrategy, accuracies: dict[int, float], seconds: float
) -> dict[str, Any]:
    """The run's JSON report: settings, per-round accuracy, per-client training and privacy."""
    rounds = []
    for r in range(settings.rounds + 1):
        entry = dict(strategy.round_log.get(r, {"round": r}))
        entry["accuracy"] = accuracies.get(r)
        rounds.append(entry)
    clients = {}
    for partition, info in sorted(strategy.clients.items()):
        item = {"rounds_trained": info["rounds_trained"], "rounds_refused": info["rounds_refused"]}
        item["steps"] = len(info["rounds_trained"]) * settings.local_steps
        if "privacy" in info:
            item.update(
                {k: v for k, v in info["privacy"].items() if k not in ("rounds_trained", "rounds_refused")}
            )
        clients[str(partition)] = item
    return {
        "settings": settings.to_record(),
        "final_accuracy": accuracies.get(settings.rounds),
        "rounds": rounds,
        "clients": clients,
        "seconds": seconds,
    }


def make_server_app(settings: Optional[FedSettings] = None) -> ServerApp:
    """A ServerApp running ``settings``, or (``None``) the settings of the run config (deployment)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings or FedSettings.from_mapping(context.run_config), context)

    return server


app = make_server_app()
