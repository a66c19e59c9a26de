"""SecAgg+ run in one process: every client's and the server's messages really computed, serialised and exchanged.

:func:`secure_sum` drives one round of the protocol between :class:`~fedlm.privacy.secagg.client.SecAggClient`
objects and a :class:`~fedlm.privacy.secagg.server.SecAggServer`; only the bytes of Flower-encoded messages pass
between them. Tests (and the benchmark) can make clients drop at a stage (they reply no more from that stage on) and
alter a message in transit. Bytes and compute time are counted per client and for the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.common import RecordDict

from fedlm.privacy.secagg import wire
from fedlm.privacy.secagg.client import SecAggClient
from fedlm.privacy.secagg.server import SecAggServer
from fedlm.privacy.secagg.workflow import STAGES, key_stages, masked_stage, unmask_stage

__all__ = ["STAGES", "InProcessChannel", "SecureSumResult", "Tamper", "secure_sum"]

#: A hook that may alter a message in transit: (stage, sender, receiver, encoded message) -> encoded message.
Tamper = Callable[[str, int, int, bytes], bytes]
SERVER = 0


@dataclass
class SecureSumResult:
    """The modular sum of the survivors' codes and what the round cost."""

    total: np.ndarray
    survivors: list[int]
    dropped_before_input: list[int]
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)
    client_seconds: float = 0.0
    server_seconds: float = 0.0


@dataclass
class _Traffic:
    up: dict[int, int]
    down: dict[int, int]
    tamper: Tamper | None
    client_seconds: float = 0.0
    server_seconds: float = 0.0

    def send(self, stage: str, src: int, dst: int, msg: RecordDict) -> RecordDict:
        blob = wire.to_bytes(msg)
        if self.tamper is not None:
            blob = self.tamper(stage, src, dst, blob)
        if src != SERVER:
            self.up[src] += len(blob)
        if dst != SERVER:
            self.down[dst] += len(blob)
        return wire.from_bytes(blob)


@dataclass
class InProcessChannel:
    """The simulation's channel: each message serialised, handed to the client's ``SecAggClient`` in this process,
    and the reply serialised back; ``drop[stage]``: clients that reply no more from that stage on."""

    clients: Mapping[int, SecAggClient]
    codes: Mapping[int, np.ndarray]
    drop: Mapping[str, set[int]]
    traffic: _Traffic
    gone: set[int] = field(default_factory=set)

    def exchange(self, stage: str, outbox: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Every client's reply to its message of ``stage``, but those of clients that dropped."""
        self.gone.update(self.drop.get(stage, set()))
        replies = {}
        for u, msg in outbox.items():
            received = self.traffic.send(stage, SERVER, u, msg)
            if u in self.gone:
                continue
            tick = time.perf_counter()
            reply = self._act(stage, self.clients[u], received)
            self.traffic.client_seconds += time.perf_counter() - tick
            replies[u] = self.traffic.send(stage, u, SERVER, reply)
        return replies

    def _act(self, stage: str, client: SecAggClient, msg: RecordDict) -> RecordDict:
        if stage == "advertise_keys":
            return client.advertise_keys(msg)
        if stage == "share_keys":
            return client.share_keys(msg)
        if stage == "masked_input":
            return client.masked_input(msg, self.codes[client.index])
        return client.unmask(msg)


def secure_sum(
    codes: Mapping[int, np.ndarray],
    *,
    round_num: int,
    threshold: int,
    neighbours: int | None,
    graph_seed: int,
    drop: Mapping[str, set[int]] | None = None,
    tamper: Tamper | None = None,
) -> SecureSumResult:
    """The sum mod 2^32 of the uint32 ``codes`` of clients ``1..n`` that survive to send their masked input.

    ``drop[stage]``: clients that stop replying at that stage (one of :data:`STAGES`). Raises
    :class:`~fedlm.privacy.secagg.server.SecAggAbort` when too few clients remain and
    :class:`~fedlm.privacy.secagg.primitives.TamperedShareError` when an altered share is detected.
    """
    n = len(codes)
    if sorted(codes) != list(range(1, n + 1)):
        raise ValueError(f"clients must be numbered 1..{n}, got {sorted(codes)}")
    length = next(iter(codes.values())).shape[0]
    drop = {s: set(v) for s, v in (drop or {}).items()}
    unknown = set(drop) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; the stages are {STAGES}")
    channel = InProcessChannel({u: SecAggClient(u) for u in codes}, codes, drop, _Traffic({u: 0 for u in codes}, {u: 0 for u in codes}, tamper))
    started = time.perf_counter()
    server = SecAggServer(round_num, n, threshold, neighbours, length, graph_seed)
    requests = masked_stage(server, channel, key_stages(server, channel))
    total = unmask_stage(server, channel, requests)
    traffic = channel.traffic
    traffic.server_seconds = time.perf_counter() - started - traffic.client_seconds  # serialisation included
    return SecureSumResult(
        total, sorted(server.masked), sorted(server.dropped), traffic.up, traffic.down, traffic.client_seconds, traffic.server_seconds
    )
