"""A Flower ``Grid`` that runs the ClientApp in-process: the ServerApp logic without Ray or a SuperLink."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from types import SimpleNamespace

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


class LocalGrid(Grid):
    """``num_nodes`` nodes with ``partition-id`` 0..n-1, each with its own persistent ``Context``."""

    def __init__(self, client_app, num_nodes: int, tamper=None):
        self.client_app = client_app
        self.tamper = tamper  # optional f(reply) -> reply, to simulate a faulty or malicious client
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        # what the simulation runtime sets for the ServerApp process before it creates messages
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    @property
    def run(self):
        """What Flower's legacy client manager reads (the SecAgg+ workflow): the run id."""
        return SimpleNamespace(run_id=1)

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(msg)
            # a copy, as if serialized: a client must not see (or mutate) what another node receives
            reply = self.client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies
