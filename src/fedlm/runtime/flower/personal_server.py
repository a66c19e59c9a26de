"""The server's side of personalization over Flower: it keeps no personal state, it only tells the nodes what they
need to keep theirs as the simulation does, and collects their personal evaluation after the last round.

:class:`NodeStoreSync` (a round observer) puts into every message to a node (the handshake, each train message,
the personal evaluation) where the run (re)started and which checkpoint rounds are kept (at the first of them in a
Flower run the node rolls back its client's versions to the start, after each round it prunes them, see
:mod:`fedlm.runtime.flower.node_personal`). :func:`personal_on_nodes` sends the final global adapter to every node
(``query.fedlm_personal_eval``) and returns their ``personal`` records in the simulation's client order; a client
without a node or whose node failed is logged (``split: "flower"``, ``event: "personal_missing"``) and left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Message

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import TensorDict
from fedlm.federation.checkpoint import list_checkpoints
from fedlm.runtime.flower.messages import PERSONAL_EVAL, meta, personal_eval_content

if TYPE_CHECKING:
    from fedlm.runtime.flower.runtime import FlowerRuntime

PERSONAL_META = "personal"  # train message meta: {"start": round the run (re)started after, "checkpoints": kept rounds}


def _kept_rounds(checkpoints: Path) -> list[int]:
    return [int(p.name.removeprefix("round_")) for p in list_checkpoints(checkpoints)]


@dataclass
class NodeStoreSync(RoundObserver):
    """Keeps the runtime's train-message metadata in step with the run: the start round and the kept checkpoints."""

    runtime: FlowerRuntime
    checkpoints: Path

    def on_start(self, state: TensorDict, start_round: int) -> None:
        self.runtime.task_meta[PERSONAL_META] = {"start": start_round, "checkpoints": _kept_rounds(self.checkpoints)}

    def on_round(self, record: RoundRecord) -> None:
        self.runtime.task_meta[PERSONAL_META] = {**self.runtime.task_meta.get(PERSONAL_META, {}), "checkpoints": _kept_rounds(self.checkpoints)}


def personal_on_nodes(runtime: FlowerRuntime, state: TensorDict) -> list[dict[str, Any]]:
    """Every node's ``personal`` records for the final global ``state`` (the client order of the federation)."""
    config, rounds = runtime.config, runtime.config.federation.rounds
    runtime.discover(rounds)
    sent = {node: client for client, node in runtime.nodes.items()}
    messages = [
        Message(personal_eval_content(client, state, config, runtime.task_meta), dst_node_id=node, message_type=PERSONAL_EVAL)
        for node, client in sent.items()
    ]
    replies = list(runtime.grid.send_and_receive(messages, timeout=runtime.round_timeout_s)) if messages else []
    by_client: dict[str, list[dict[str, Any]]] = {}
    missing: dict[str, str] = {c: "no SuperNode serves it" for c in runtime.client_names if c not in runtime.nodes}
    for reply in replies:
        client = sent.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_error():
            missing[client] = f"node {reply.metadata.src_node_id} failed: {reply.error.reason}"
            continue
        answer = meta(reply.content)
        by_client[client] = list(answer["records"])
        runtime.log.append({"round": rounds, "split": "flower", "event": "personal", "client": client, "folder": answer["folder"]})
    for client in sent.values():
        if client not in by_client and client not in missing:
            missing[client] = f"no reply within {runtime.round_timeout_s:g}s"
    for client, why in sorted(missing.items()):
        runtime.console.print(f"[yellow]flower: no personal evaluation of client {client}: {why}[/yellow]")
        runtime.log.append({"round": rounds, "split": "flower", "event": "personal_missing", "client": client, "reason": why})
    served = sum(1 for c in by_client)
    runtime.console.print(f"personal adapters of {served} clients written on their nodes (server: none)")
    return [record for client in runtime.client_names for record in by_client.get(client, [])]
