"""The server side of SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017, Fig. 4): route keys and encrypted shares,
sum the masked inputs, reconstruct what cancels the masks, and learn only the sum of the survivors' inputs.

U1 advertised keys, U2 shared them, U3 sent a masked input, U5 answered the unmask request. The sum is over U3:
a client that drops after its masked input is still summed (its self-mask seed b is rebuilt from t shares); one
that drops before it is not (its private mask key s is rebuilt, and the pair masks its surviving neighbours added
for it are removed). Fewer than t holders at any step, or a reconstructed secret that does not match what its owner
published (the commitment to b, the public key of s), aborts the round: :class:`SecAggAbort` /
:class:`~fedlm.privacy.secagg.primitives.TamperedShareError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.common import RecordDict

from fedlm.core.errors import FedlmError
from fedlm.privacy.secagg import primitives as crypto
from fedlm.privacy.secagg import wire
from fedlm.privacy.secagg.client import MASK_LABEL, pair_mask
from fedlm.privacy.secagg.graph import neighbours


class SecAggAbort(FedlmError):
    """The round's secure aggregation cannot finish (too many dropouts); the round is skipped."""


class SecAggServer:
    """The server's protocol state for one round over clients ``1..n``."""

    def __init__(self, round_num: int, num_clients: int, threshold: int, k: int | None, length: int, graph_seed: int) -> None:
        self.round, self.threshold, self.length = round_num, threshold, length
        self.clients = list(range(1, num_clients + 1))
        self.graph = neighbours(self.clients, k, graph_seed)
        self.keys: dict[int, tuple[bytes, bytes, bytes]] = {}  # u -> (pk_c, pk_s, commit_b)
        self.shared: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}
        self.dropped: set[int] = set()

    def _need(self, alive: set[int], stage: str) -> None:
        if len(alive) < self.threshold:
            raise SecAggAbort(f"secure aggregation aborted at {stage}: {len(alive)} clients left, fewer than the threshold {self.threshold}")

    def setup_messages(self) -> dict[int, RecordDict]:
        """Stage 0: each client's neighbours, the threshold, the vector length."""
        return {
            u: wire.message({"round": self.round, "threshold": self.threshold, "length": self.length, "neighbours": self.graph[u]})
            for u in self.clients
        }

    def broadcast_keys(self, replies: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Stage 1 -> 2: every advertiser gets its advertising neighbours' public keys."""
        for u, msg in replies.items():
            f = wire.fields(msg)
            self.keys[u] = (bytes(f["pk_c"]), bytes(f["pk_s"]), bytes(f["commit_b"]))
        self._need(set(self.keys), "key advertisement")
        out = {}
        for u in self.keys:
            ids = [v for v in self.graph[u] if v in self.keys]
            out[u] = wire.message(
                {
                    "ids": ids,
                    "pk_c": [self.keys[v][0] for v in ids],
                    "pk_s": [self.keys[v][1] for v in ids],
                    "commit_b": [self.keys[v][2] for v in ids],
                }
            )
        return out

    def route_shares(self, replies: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Stage 2 -> 3: each sharer gets the encrypted shares addressed to it by the other sharers."""
        self.shared = set(replies)
        self._need(self.shared, "key sharing")
        inbox: dict[int, tuple[list[int], list[bytes]]] = {u: ([], []) for u in self.shared}
        for src in sorted(replies):
            f = wire.fields(replies[src])
            for dst, blob in zip(f["dst"], f["ciphertexts"]):
                if int(dst) in self.shared:
                    inbox[int(dst)][0].append(src)
                    inbox[int(dst)][1].append(bytes(blob))
        return {u: wire.message({"src": src, "ciphertexts": blobs}) for u, (src, blobs) in inbox.items()}

    def unmask_requests(self, replies: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Stage 3 -> 4: store the masked inputs; ask the survivors for the shares that remove the masks."""
        self.masked = {u: wire.vector(m) for u, m in replies.items() if u in self.shared}
        for u, y in self.masked.items():
            if y.shape != (self.length,):
                raise SecAggAbort(f"secure aggregation aborted: client {u} sent {y.shape[0]} values, expected {self.length}")
        self._need(set(self.masked), "masked input collection")
        self.dropped = self.shared - set(self.masked)
        request = wire.message({"survivors": sorted(self.masked), "dropped": sorted(self.dropped)})
        return {u: request for u in self.masked}

    def unmask(self, replies: Mapping[int, RecordDict]) -> np.ndarray:
        """Stage 4: the modular sum of the survivors' inputs (uint32)."""
        self._need(set(replies), "unmasking")
        b_shares: dict[int, list[bytes]] = {u: [] for u in self.masked}
        s_shares: dict[int, list[bytes]] = {u: [] for u in self.dropped}
        for responder in sorted(replies):
            f = wire.fields(replies[responder])
            for src, kind, blob in zip(f["ids"], f["kinds"], f["shares"]):
                target = b_shares if int(kind) == 0 else s_shares
                if int(src) in target:
                    target[int(src)].append(bytes(blob))
        total = np.zeros(self.length, dtype=np.uint32)
        for y in self.masked.values():
            total += y
        for u, shares in b_shares.items():
            seed = self._rebuild(u, shares, "self-mask seed b")
            if crypto.commitment(seed) != self.keys[u][2]:
                raise crypto.TamperedShareError(
                    f"secure aggregation aborted: client {u}'s rebuilt seed b does not match its commitment (a tampered share)"
                )
            total -= crypto.mask(seed, self.length)
        for u, shares in s_shares.items():
            key = crypto.private_from_bytes(self._rebuild(u, shares, "mask key s"))
            if crypto.public_bytes(key) != self.keys[u][1]:
                raise crypto.TamperedShareError(
                    f"secure aggregation aborted: client {u}'s rebuilt key s does not match its public key (a tampered share)"
                )
            for v in self.graph[u]:
                if v in self.masked:  # v added its pair mask for u; remove it
                    total -= pair_mask(crypto.agree(key, self.keys[v][1], MASK_LABEL), self.length, v, u)
        return total

    def _rebuild(self, owner: int, shares: list[bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggAbort(
                f"secure aggregation aborted: {len(shares)} shares of client {owner}'s {what}, fewer than the threshold {self.threshold}"
            )
        try:
            return crypto.reconstruct(shares)
        except ValueError as exc:  # malformed share bytes (bad padding after combining)
            raise crypto.TamperedShareError(
                f"secure aggregation aborted: client {owner}'s {what} cannot be rebuilt ({exc}); a tampered share"
            ) from None
