"""Client side of a ``secure_aggregation`` run: SecAgg+ (Bell et al., CCS 2020) via ``secaggplus_mod``.

The server sees only ``sum_i n_i d_i / sum_i n_i`` over the round's clients, never one client's update. Each
client trains as usual (:func:`.client_round.local_round`, DP included) and replies in Flower's legacy
``FitRes`` record layout, which the mod needs:

* ``parameters``: ``d_i = theta_i - theta_global`` for the trainable tensors, in sorted key order (small
  values: the mod clips to ``+-clipping_range`` after scaling by ``n_i / max_weight``, then quantizes);
* ``num_examples``: ``n_i``, the weight; a client that refuses to train (privacy budget spent) sends
  ``n_i = 0`` and zeros, so it takes part in the protocol without moving the sum;
* ``metrics``: the round's bookkeeping and, under DP, the privacy report (scalars, no arrays).

The mod masks and quantizes the update, sends only the masked vector, and empties the reply's arrays.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from .client_round import local_round
from .settings import SECAGG_CLIPPING_RANGE, FedSettings

STATE_KEYS = "state-keys"  # fit config entry: the global state's keys, newline-separated, in array order


def optional_secaggplus_mod(msg: Message, context: Context, call_next):
    """``secaggplus_mod`` for the SecAgg+ stages of a secure run; every other message passes through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_round(msg: Message) -> bool:
    """Whether ``msg`` is the legacy ``FitIns`` of a SecAgg+ round (else a plain train message)."""
    return "fitins.parameters" in msg.content.array_records


def decode_state(keys: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from parallel key and array lists (the legacy ``Parameters`` carry no names)."""
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} state keys")
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays)}


def train(msg: Message, context: Context) -> Message:
    """Train one round from the ``FitIns``; reply ``d_i`` and ``n_i`` as a ``FitRes`` (module docstring)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    settings = FedSettings.from_mapping(config)
    global_state = decode_state(
        str(config[STATE_KEYS]).split("\n"), parameters_to_ndarrays(fitins.parameters)
    )
    sent, metrics, privacy = local_round(context, settings, int(config["server-round"]), global_state)
    trained = bool(metrics["trained"])
    weight = int(metrics["num-examples"]) if trained else 0
    deltas = []
    for key in sorted(sent):
        delta = (sent[key] - global_state[key]).to(torch.float32) if trained else torch.zeros_like(sent[key])
        # the mod would clip silently: refuse instead, naming the tensor
        peak = float(delta.abs().max()) * weight / settings.secagg_max_weight if delta.numel() else 0.0
        if not peak <= SECAGG_CLIPPING_RANGE:
            raise ValueError(
                f"client {metrics['partition-id']}: update of {key} reaches {peak:.3g} after SecAgg+ "
                f"scaling, outside +-{SECAGG_CLIPPING_RANGE} (or is not finite)"
            )
        deltas.append(delta.numpy())
    reply_metrics = dict(metrics)
    if privacy is not None:
        reply_metrics["privacy"] = json.dumps(privacy.report())
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters(deltas),
        num_examples=weight,
        metrics=reply_metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
