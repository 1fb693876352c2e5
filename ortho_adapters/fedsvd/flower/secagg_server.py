"""Server side of a ``secure_aggregation`` run: SecAgg+ (Bell et al., CCS 2020) with FedSVD's server step.

Flower 1.42 offers SecAgg+ only in its legacy stack: :class:`flwr.server.workflow.SecAggPlusWorkflow` inside a
``DefaultWorkflow`` with a ``LegacyContext`` and a legacy ``Strategy``. The workflow unmasks only the sum and
hands the strategy ``mean_d = sum_i n_i d_i / sum_i n_i`` in place of every client's parameters, where
``d_i = theta_i - theta_global`` (:mod:`.secagg_client`). That is all the server steps need, because each is
linear in the clients' trainable tensors before its last step:

* FedSVD: ``B_avg = B_global + mean_d`` (``A`` is frozen on clients), then ``B_avg A = U S V^T``;
* FFA-LoRA: ``B_avg``; FedAvg-LoRA: ``A_avg`` and ``B_avg``.

So :class:`SecureAggregationStrategy` applies the arm's step to the single state ``theta_global + mean_d``,
and sampling, bookkeeping, evaluation, checkpoints and the report are those of
:class:`~.server_app.FedSVDStrategy`. Quantization (``2**22`` levels over ``+-8``) costs about ``1e-6``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from .secagg_client import STATE_KEYS, decode_state
from .server_app import FedSVDStrategy
from .settings import SECAGG_CLIPPING_RANGE

# SecAgg+ shares each client's secrets with all others in the round and needs 2/3 of them to unmask:
# up to a third of a round's clients may drop out after sharing keys
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3


def encode_state(state: dict[str, torch.Tensor]) -> Parameters:
    """Legacy ``Parameters`` of ``state`` in sorted key order (see :data:`.secagg_client.STATE_KEYS`)."""
    return ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in sorted(state)])


class SecureAggregationStrategy(Strategy):
    """Legacy Strategy around a :class:`FedSVDStrategy`: it only ever sees the SecAgg+ average of a round."""

    def __init__(
        self,
        inner: FedSVDStrategy,
        grid: Grid,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
    ) -> None:
        self.inner = inner
        self.grid = grid
        self.evaluate_fn = evaluate_fn
        self.keys = sorted(inner.global_state)

    def initialize_parameters(self, client_manager: ClientManager) -> Optional[Parameters]:
        return encode_state(self.inner.global_state)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The same seeded sample as a plain run; the global state and settings as legacy ``FitIns``."""
        server_round += self.inner.round_offset
        self.inner.global_state = decode_state(self.keys, parameters_to_ndarrays(parameters))
        nodes = self.inner.sample(self.grid, server_round)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        missing = [n for n in nodes if n not in proxies]
        if missing:
            raise RuntimeError(f"round {server_round}: sampled nodes {missing} are not connected")
        config = {
            **self.inner.settings.to_record(),
            "server-round": server_round,
            STATE_KEYS: "\n".join(self.keys),
        }
        return [(proxies[n], FitIns(parameters, dict(config))) for n in nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Optional[Parameters], dict[str, Any]]:
        """Book every client's scalars; apply the arm's step to ``theta_global + mean_d``."""
        server_round += self.inner.round_offset
        if failures:
            raise RuntimeError(f"round {server_round}: SecAgg+ client failures: {failures}")
        refused, counts, losses = [], [], []
        for _, res in results:
            partition = int(res.metrics["partition-id"])
            if self.inner.record_reply(server_round, partition, res.metrics, res.metrics.get("privacy")):
                counts.append(int(res.num_examples))
                losses.append(float(res.metrics["train-loss"]))
            else:
                refused.append(partition)
        if not counts:  # nobody trained: the unmasked "average" is 0 / 0, ignore it
            self.inner.finish_round(server_round, [], [], [], [], refused)
            return None, {}
        sent_keys = self.inner.sent_keys
        mean = decode_state(sent_keys, parameters_to_ndarrays(results[0][1].parameters))
        for key in sent_keys:
            expected = self.inner.global_state[key].shape
            if mean[key].shape != expected or not torch.isfinite(mean[key]).all():
                raise ValueError(
                    f"round {server_round}: SecAgg+ aggregate of {key} has shape {tuple(mean[key].shape)} "
                    f"(expected {tuple(expected)}) or non-finite values; global state unchanged"
                )
        glob = self.inner.global_state
        averaged = {**glob, **{k: glob[k] + mean[k].to(glob[k].dtype) for k in sent_keys}}
        # the weighted mean of the losses: scalars, sent in the clear like the example counts
        weighted_loss = [sum(c * x for c, x in zip(counts, losses)) / sum(counts)]
        record, _ = self.inner.finish_round(
            server_round,
            [averaged],
            [sum(counts)],
            ["SecAgg+ aggregate"],
            weighted_loss,
            refused,
            len(counts),
        )
        state = record.to_torch_state_dict()
        return encode_state(state), {"train-loss": self.inner.round_log[server_round]["train_loss"]}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> Optional[tuple[float, dict[str, Any]]]:
        """Centralized evaluation (and checkpoint) of the round's global state."""
        absolute = server_round + self.inner.round_offset
        if server_round > 0 and "clients_trained" not in self.inner.round_log.get(absolute, {}):
            raise RuntimeError(
                f"round {absolute}: secure aggregation halted before unmasking (too few clients answered; "
                "see the Flower log); no aggregate"
            )
        state = decode_state(self.keys, parameters_to_ndarrays(parameters))
        metrics = self.evaluate_fn(server_round, ArrayRecord.from_torch_state_dict(state))
        return 0.0, dict(metrics)


def run_secure_rounds(
    grid: Grid,
    inner: FedSVDStrategy,
    num_rounds: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
    context: Optional[Context] = None,
) -> None:
    """Run ``num_rounds`` SecAgg+ rounds of ``inner``'s experiment on ``grid``."""
    base = context or Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    strategy = SecureAggregationStrategy(inner, grid, evaluate_fn)
    legacy = LegacyContext(base, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = SecAggPlusWorkflow(
        num_shares=NUM_SHARES,
        reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=inner.settings.secagg_max_weight,
        clipping_range=SECAGG_CLIPPING_RANGE,
        timeout=inner.settings.node_wait_s,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
