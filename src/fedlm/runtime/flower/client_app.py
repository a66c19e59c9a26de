"""fedlm's Flower ClientApp: one SuperNode serves one client, trains it with the simulation's ``ClientTrainer``.

The node's ``--node-config`` names its client: ``partition-id=K`` is the K-th client of the config's partition
(the simulation's client order; ``partition.method: node_local``: ``partition.clients[K]``), and optionally
``fedlm-config="/path/local.yaml"`` gives the node's own copy of the config (its model and data paths; default: the
config embedded in the app bundle). With ``node_local`` the node trains on its own ``data.train`` only.

``fedlm flower supernode`` runs this app in one long-lived process beside the SuperNode
(:mod:`fedlm.runtime.flower.worker`), which keeps the node's session (base model with adapter, tokenizer, its data)
and the federation's client names between messages (:mod:`fedlm.runtime.flower.node_cache`, keyed by the node's
config); under Flower's own ``flwr-clientapp`` (a fresh process per message) each train message builds them anew
(the base model from the local safetensors cache for GGUF models, see :mod:`fedlm.models.gguf_cache`). The update's
metrics (in ``metrics.jsonl``) time each message: ``process_start_s`` (a fresh process: spawn, imports and pulling the
task; the long-lived one: pulling the task), ``model_load_s`` (0 when the session was kept, ``session_reused`` 1),
``setup_s`` (config, model, adapter, data), ``local_train_s`` and ``clientapp_s`` (all of it). A client's memory
(e.g. SCAFFOLD's c_i) stays on the node, in Flower's per-node ``context.state``, never in the kept session. With
``personalization.method`` the client's personal state stays on the node too, in its state directory (node-config
``fedlm-state-dir``, checked at the handshake), and ``query.fedlm_personal_eval`` after the last round writes its
personal adapter there and answers its personal evaluation (:mod:`fedlm.runtime.flower.node_personal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedlm.config.io import load_config, validate_config
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.runtime.flower import node_cache, secagg_node
from fedlm.runtime.flower.secagg_envelope import SECAGG_ACTION
from fedlm.runtime.flower.state_dir import node_state_root

# torch and the model code are imported where a message needs them, so that a fresh ClientApp process for a secure
# aggregation key stage (Flower's process per message) starts without them.

app = ClientApp()
REFUSED = 4001  # error code of a refused node (config mismatch, bad partition id)
FAILED = 4002  # error code of a failed local training (non-finite loss)


def node_config_of(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The node's config: its own file (``fedlm-config`` in the node config) or the one in the app bundle."""
    local = node_config.get("fedlm-config")
    if local:
        return load_config(str(local))
    return validate_config(yaml.safe_load(str(run_config["fedlm-config"])))


def client_names(config: ExperimentConfig) -> list[str]:
    """The federation's client names in partition order, without loading a model (``node_local``: the config's list);
    a long-lived ClientApp process reads and splits the data once per config."""
    if config.partition.method == "node_local":
        return list(config.partition.clients or [])
    from fedlm.data.prepare import load_split_records, split_among_clients  # noqa: PLC0415 - keep the import light

    def compute() -> list[str]:
        train, _ = load_split_records(config.data, config.seed)
        return split_among_clients(train, config.partition, config.seed).client_names

    return node_cache.client_names(config, compute)


def check_local_data(config: ExperimentConfig) -> int:
    """``node_local``: the node's own ``data.train`` can be read and fits the objective; its record count."""
    from fedlm.data.readers import read_records  # noqa: PLC0415
    from fedlm.objectives import objective_of  # noqa: PLC0415 - the registry imports torch

    records = read_records(config.data.train, "data.train")
    objective_of(config).check_records(records, "data.train", config.data)
    return len(records)


def client_of(partition_id: Any, names: list[str]) -> str:
    """The client name of ``partition-id``; refuses an id outside the federation."""
    if partition_id is None:
        raise FedlmError("the SuperNode has no `partition-id` in its --node-config; start it with --node-config 'partition-id=K'")
    if not isinstance(partition_id, int) or not 0 <= partition_id < len(names):
        raise FedlmError(
            f"partition-id {partition_id!r} is outside the federation: it has {len(names)} clients "
            f"(partition-id 0..{len(names) - 1}: {', '.join(names)})"
        )
    return names[partition_id]


def check_node(server: Mapping[str, Any], node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[str, int]:
    """(client name, partition id) this node serves, given the server's handshake ``server``; raises
    :class:`FedlmError` naming the config difference or the bad partition id."""
    from fedlm.runtime.flower.messages import config_difference, config_hash, shared_config  # noqa: PLC0415

    config = node_config_of(node_config, run_config)
    if server["config_hash"] != config_hash(config):
        raise FedlmError(f"the node's config differs from the server's in {config_difference(server['shared_config'], shared_config(config))}")
    partition_id = node_config.get("partition-id")
    client = client_of(partition_id, client_names(config))
    if config.personalization.method is not None:  # the client's personal state lives on this node
        node_state_root(config.personalization.method, node_config)
    return client, int(partition_id)  # type: ignore[arg-type]


@app.query("fedlm_hello")
def hello(msg: Message, context: Context) -> Message:
    """Answer the server's handshake with the client this node serves, or refuse (config or partition)."""
    from fedlm.runtime.flower.messages import hello_reply, meta  # noqa: PLC0415

    try:
        server = meta(msg.content)
        client, partition_id = check_node(server, context.node_config, context.run_config)
        if server.get("personal") is not None:  # personalization.method: the node's store follows the run's start
            from fedlm.runtime.flower.node_personal import sync_on_hello  # noqa: PLC0415 - torch-heavy, only then

            sync_on_hello(server, context)
    except FedlmError as exc:
        return Message(Error(REFUSED, str(exc)), reply_to=msg)
    return Message(hello_reply(client, partition_id), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's client on the task: the simulation's trainer, data and seeds."""
    from fedlm.core.task import NonFiniteLossError  # noqa: PLC0415
    from fedlm.runtime.flower.messages import update_content  # noqa: PLC0415
    from fedlm.runtime.flower.node_train import train_on_node  # noqa: PLC0415

    try:
        local = train_on_node(msg.content, context)
    except (FedlmError, NonFiniteLossError) as exc:
        return Message(Error(REFUSED if isinstance(exc, FedlmError) else FAILED, str(exc)), reply_to=msg)
    return Message(update_content(local.update, local.task.plan.rank), reply_to=msg)


@app.query("fedlm_personal_eval")
def personal_eval(msg: Message, context: Context) -> Message:
    """After the last round (``personalization.method``): write this node's personal adapter in its state directory
    and answer the personal evaluation's records (:mod:`fedlm.runtime.flower.node_personal`)."""
    from fedlm.core.task import NonFiniteLossError  # noqa: PLC0415
    from fedlm.runtime.flower.messages import personal_eval_reply  # noqa: PLC0415
    from fedlm.runtime.flower.node_personal import evaluate_on_node  # noqa: PLC0415 - torch-heavy

    try:
        records, folder = evaluate_on_node(msg.content, context)
    except (FedlmError, NonFiniteLossError) as exc:
        return Message(Error(REFUSED if isinstance(exc, FedlmError) else FAILED, str(exc)), reply_to=msg)
    return Message(personal_eval_reply(records, str(folder)), reply_to=msg)


app.query(SECAGG_ACTION)(secagg_node.key_stage)  # SecAgg+ rounds 0-2 and 4 (privacy.secure_aggregation)
app.train(SECAGG_ACTION)(secagg_node.masked_stage)  # round 3: train, check, encode and mask the update
