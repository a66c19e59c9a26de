"""Downlink compression: the server broadcasts the compressed change of the global model, and every client starts
from the same decoded replica of it.

Definition. The server keeps the replica R that the clients hold (R_0: the initial adapter, which every client
builds from the config). Before round t it encodes the difference between the global model w and the replica,

    m_t = C(w - R_{t-1}),        R_t = R_{t-1} + decode(m_t),

with the quantizer's rounding seeded from (seed, round), and the round's clients train from R_t (cut to their rank).
What the encoding dropped stays in w - R_t and is sent in a later round: error feedback on the server, as in
DoubleSqueeze (Tang, Yu, Lian, Zhang & Liu 2019, Algorithm 1) and the server side of Philippenko & Dieuleveut 2020
(Artemis). The aggregator applies the clients' deltas (relative to R_t) to w, as those papers do.

A client that missed rounds must replay every message since the last round it took part in (each a separate
safetensors blob), or download R_t dense if that is smaller; its download counts whichever is smaller, so every
client holds R_t exactly (decoding is deterministic and in the same order on both sides). Its extras (e.g.
SCAFFOLD's c) travel dense beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlm.compression.catch_up import forget_failed, forget_on_start, sync_tasks
from fedlm.compression.codec import Codec, shapes_of
from fedlm.compression.traffic import record_sizes
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.core.task import ClientTask
from fedlm.core.update import TensorDict
from fedlm.federation.tasks import TaskBuilder
from fedlm.federation.wire import serialized_bytes


@dataclass
class DownlinkState:
    """The replica the clients hold, each round's message size, and the last round each client was sent."""

    replica: TensorDict
    message_bytes: dict[int, int] = field(default_factory=dict)  # round -> bytes of m_t
    synced: dict[str, int] = field(default_factory=dict)  # client -> last round it received (0: the initial adapter)
    # Clients on other machines (Flower): the messages themselves, kept for the clients' catch-up (not checkpointed;
    # a message no longer kept means that client gets the dense model, see :mod:`fedlm.compression.catch_up`).
    keep_messages: bool = False
    messages: dict[int, TensorDict] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and integers only (saved in the checkpoint)."""
        return {
            "replica": dict(self.replica),
            "message_bytes": {str(k): torch.tensor(v) for k, v in self.message_bytes.items()},
            "synced": {k: torch.tensor(v) for k, v in self.synced.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.replica = dict(state["replica"])
        self.message_bytes = {int(k): int(v) for k, v in state["message_bytes"].items()}
        self.synced = {k: int(v) for k, v in state["synced"].items()}


def advance_replica(
    codec: Codec, state: Mapping[str, torch.Tensor], replica: Mapping[str, torch.Tensor], generator: torch.Generator
) -> tuple[TensorDict, TensorDict]:
    """(R_t, m_t): the replica after the message that encodes ``state - replica``, and the message."""
    difference = {n: state[n].to(torch.float32) - replica[n].to(torch.float32) for n in state}
    message = codec.encode(difference, generator)
    return apply_message(codec, replica, message), message


def apply_message(codec: Codec, replica: Mapping[str, torch.Tensor], message: Mapping[str, torch.Tensor]) -> TensorDict:
    """R_t = R_{t-1} + decode(m_t), in float32 and cast back: the server's step and every client's replay of it."""
    decoded = codec.decode(message, shapes_of(replica))
    return {n: (replica[n].to(torch.float32) + decoded[n]).to(replica[n].dtype) for n in replica}


@dataclass
class CompressedDownlink(TaskBuilder, RoundObserver):
    """The task builder with the broadcast step before it; as a round observer (after the traffic meter) it puts each
    client's real download in ``download_bytes`` (the dense size beside it as ``dense_download_bytes``)."""

    codec: Codec | None = None
    seed: int = 0
    downlink: DownlinkState | None = None
    sent: dict[tuple[int, str], int] = field(default_factory=dict)

    def build(self, state: TensorDict, chosen: Sequence[str], round_num: int) -> dict[str, ClientTask]:
        """Advance the replica with this round's message, then every chosen client's task from the replica."""
        if self.codec is None or self.downlink is None:
            raise ValueError("CompressedDownlink needs a codec and its state")
        down = self.downlink
        if round_num not in down.message_bytes:  # a retried or resumed round does not broadcast twice
            generator = torch_generator(derive_seed(self.seed, "downlink-compression", round_num))
            down.replica, message = advance_replica(self.codec, state, down.replica, generator)
            down.message_bytes[round_num] = serialized_bytes(message)
            if down.keep_messages:
                down.messages[round_num] = message
        tasks = super().build(down.replica, chosen, round_num)
        return sync_tasks(tasks, down, "codec", round_num, self.sent)

    def on_start(self, state: TensorDict, start_round: int) -> None:
        forget_on_start(self.downlink)

    def on_round(self, record: RoundRecord) -> None:
        forget_failed(self.downlink, record)
        self.sent = record_sizes(record, self.sent, "download")
