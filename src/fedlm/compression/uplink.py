"""Uplink compression around any runtime: each client's update leaves the client encoded (top-k with error
feedback, or quantized) and the server decodes it before validation and aggregation.

The client side (:func:`encode_on_client`) runs where the client trains: on its SuperNode over Flower
(:mod:`fedlm.runtime.flower.node_train`, the residual in the node's ``context.state``), and in this wrapper for the
in-process simulation (the residuals in the server's :class:`~fedlm.compression.state.WithCompressionState`, saved in
checkpoints). The server side decodes with the shapes it sent, so validation, robust aggregators' distances and
client DP's clipping all see the decoded update. The upload counted in ``metrics.jsonl`` is the length of the
encoded message (safetensors, header included, with any algorithm extras), not an estimate; the dense size is
logged beside it as ``dense_upload_bytes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlm.aggregation.lora_structure import pad_like, wire_form
from fedlm.compression.codec import Codec, MalformedMessage, shapes_of
from fedlm.compression.feedback import RESIDUAL, as_memory, compress, residual_of
from fedlm.compression.traffic import record_sizes
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.federation.wire import serialized_bytes


def encode_on_client(update: ClientUpdate, codec: Codec, seed: int, rank: int | None, memory: Mapping[str, torch.Tensor]) -> ClientUpdate:
    """The update as it leaves the client: the message in ``tensors``, the new residual added to ``memory``.

    The quantizer's rounding is seeded from (seed, round, client), so the simulation and Flower send the same bytes."""
    generator = torch_generator(derive_seed(seed, "uplink-compression", update.round, update.client_id))
    message, _, residual = compress(codec, update.tensors, residual_of(memory), rank, generator)
    return dataclasses.replace(update, tensors=message, memory={**update.memory, **as_memory(residual)})


def decode_on_server(update: ClientUpdate, codec: Codec, task: ClientTask) -> ClientUpdate | ClientFailure:
    """The dense update the server aggregates (shapes of the client's download), or its rejection with the reason."""
    wire = wire_form(task.state, task.plan.rank)
    if not all(isinstance(t, torch.Tensor) for t in update.tensors.values()):
        return ClientFailure(update.client_id, update.round, "rejected: the compressed message holds something other than tensors")
    try:
        dense = pad_like(codec.decode(update.tensors, shapes_of(wire)), task.state)
    except MalformedMessage as exc:
        return ClientFailure(update.client_id, update.round, f"rejected: malformed compressed update: {exc}")
    return dataclasses.replace(update, tensors=dense)


@dataclass
class CompressedUplink(RoundObserver):
    """Runs ``inner`` and decodes what comes back; the simulation's clients are encoded here (``residuals`` given),
    Flower's on their nodes (``residuals`` None). As a round observer (after the traffic meter) it puts each
    client's encoded size in ``upload_bytes``."""

    inner: Runtime
    codec: Codec
    seed: int
    residuals: MutableMapping[str, TensorDict] | None = None
    sizes: dict[tuple[int, str], int] = field(default_factory=dict)  # (round, client) -> bytes of the message

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """Train, encode (simulation only), count and decode each client's update."""
        results: list[ClientUpdate | ClientFailure] = []
        for result in self.inner.train_clients(tasks):
            task = tasks.get(result.client_id)
            if isinstance(result, ClientFailure) or task is None:  # an unasked client: the validator rejects it
                results.append(result)
                continue
            if self.residuals is not None:
                memory = as_memory(self.residuals.get(result.client_id, {}))
                result = encode_on_client(result, self.codec, self.seed, task.plan.rank, memory)
                if self.codec.error_feedback:
                    self.residuals[result.client_id] = residual_of(result.memory)
                result = dataclasses.replace(result, memory={k: v for k, v in result.memory.items() if not k.startswith(RESIDUAL)})
            self.sizes[(result.round, result.client_id)] = serialized_bytes(result.tensors, wire_form(result.extras, task.plan.rank))
            results.append(decode_on_server(result, self.codec, task))
        return results

    def on_round(self, record: RoundRecord) -> None:
        self.sizes = record_sizes(record, self.sizes, "upload")
