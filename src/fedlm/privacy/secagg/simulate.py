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

STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
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
    traffic = _Traffic({u: 0 for u in codes}, {u: 0 for u in codes}, tamper)
    started = time.perf_counter()
    server = SecAggServer(round_num, n, threshold, neighbours, length, graph_seed)
    clients = {u: SecAggClient(u) for u in codes}
    gone: set[int] = set()

    def exchange(stage: str, outbox: Mapping[int, RecordDict], act: Callable[[SecAggClient, RecordDict], RecordDict]) -> dict[int, RecordDict]:
        gone.update(drop.get(stage, set()))
        replies = {}
        for u, msg in outbox.items():
            received = traffic.send(stage, SERVER, u, msg)
            if u in gone:
                continue
            tick = time.perf_counter()
            reply = act(clients[u], received)
            traffic.client_seconds += time.perf_counter() - tick
            replies[u] = traffic.send(stage, u, SERVER, reply)
        return replies

    def serve(step: Callable[..., dict[int, RecordDict]], *args: object) -> dict[int, RecordDict]:
        tick = time.perf_counter()
        out = step(*args)
        traffic.server_seconds += time.perf_counter() - tick
        return out

    keys = exchange("advertise_keys", serve(server.setup_messages), lambda c, m: c.advertise_keys(m))
    shares = exchange("share_keys", serve(server.broadcast_keys, keys), lambda c, m: c.share_keys(m))
    masked = exchange("masked_input", serve(server.route_shares, shares), lambda c, m: c.masked_input(m, codes[c.index]))
    unmasking = exchange("unmask", serve(server.unmask_requests, masked), lambda c, m: c.unmask(m))
    tick = time.perf_counter()
    total = server.unmask(unmasking)
    traffic.server_seconds += time.perf_counter() - tick
    del started
    return SecureSumResult(total, sorted(server.masked), sorted(server.dropped), traffic.up, traffic.down,
                           traffic.client_seconds, traffic.server_seconds)
