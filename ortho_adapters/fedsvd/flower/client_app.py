"""Flower ``ClientApp``: local training of the arm's trainable tensors, DP-SGD with a run-long accountant.

Receives the global adapter state (FedSVD: ``A`` and ``B`` of every layer) and the run settings; replies with
the trainable tensors only (FedSVD / FFA-LoRA: ``B``, plus the head when it is trained; FedAvg-LoRA: ``A``
and ``B``), the example count and, under DP, its privacy report (:func:`.client_round.local_round`). In a
``secure_aggregation`` run the train messages follow SecAgg+ instead (:mod:`.secagg_client`): the client
sends only its masked, quantized update.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .client_round import local_round, partition_of
from .secagg_client import is_secure_round, optional_secaggplus_mod
from .secagg_client import train as secure_train
from .settings import FedSettings

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's question "which partition are you?" (used for seeded client sampling)."""
    partition, num_partitions = partition_of(context)
    content = RecordDict(
        {"metrics": MetricRecord({"partition-id": partition, "num-partitions": num_partitions})}
    )
    return Message(content=content, reply_to=msg)


@app.train(mods=[optional_secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of local training SecAgg+ rounds go to :func:`.secagg_client.train`."""
    if is_secure_round(msg):
        return secure_train(msg, context)
    config = msg.content["config"]
    settings = FedSettings.from_mapping(config)
    global_state = msg.content["arrays"].to_torch_state_dict()
    sent, metrics, privacy = local_round(context, settings, int(config["server-round"]), global_state)
    content = RecordDict(
        {"arrays": ArrayRecord.from_torch_state_dict(sent), "metrics": MetricRecord(metrics)}
    )
    if privacy is not None:
        content["privacy"] = ConfigRecord({"json": json.dumps(privacy.report())})
    return Message(content=content, reply_to=msg)
