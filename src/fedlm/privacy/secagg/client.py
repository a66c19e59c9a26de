"""The client side of SecAgg+ (Bell et al. 2020, Algorithm 1 with the SecAgg rounds of Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS, Fig. 4).

Per round a client, known by a 1-based index:
0. receives the setup (its neighbours, the threshold t, the vector length);
1. advertises two fresh X25519 public keys (c: to encrypt shares, s: to agree masks) and a commitment to a fresh
   self-mask seed b;
2. Shamir-shares b and its private key s among its neighbours and itself (t of them reconstruct), and sends each
   neighbour its shares encrypted under the pair's agreed key, through the server;
3. sends y = x + PRG(b) + sum_{v in N} +-PRG(s_uv) mod 2^32 (+ for v > u, - for v < u), masking only with the
   neighbours whose shares it received;
4. for each neighbour that sent a masked input it reveals that neighbour's b share, for each that dropped its s
   share, never both for one client, and refuses when the survivor set is below t or overlaps the dropped set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.common import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate

from fedlm.core.errors import FedlmError
from fedlm.privacy.secagg import primitives as crypto
from fedlm.privacy.secagg import wire

ENC_LABEL, MASK_LABEL = b"fedlm-secagg-encryption", b"fedlm-secagg-mask"


def associated_data(round_num: int, src: int, dst: int) -> bytes:
    """What binds an encrypted share to its round, sender and receiver."""
    return b"".join(i.to_bytes(8, "little") for i in (round_num, src, dst))


def pair_mask(seed: bytes, length: int, own: int, other: int) -> np.ndarray:
    """The pair mask ``own`` adds for ``other``: +PRG(s) when other > own, -PRG(s) otherwise (mod 2^32)."""
    words = crypto.mask(seed, length)
    return words if other > own else (np.uint32(0) - words)


class SecAggClient:
    """One client's protocol state for one round."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.round = 0
        self.threshold = 0
        self.length = 0
        self.neighbours: list[int] = []
        self._key_c = crypto.new_private_key()
        self._key_s = crypto.new_private_key()
        self._seed_b = crypto.random_seed()
        self._public: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (b share, s share) it gave me

    def to_record(self) -> ConfigRecord:
        """The whole state between two stages, private keys included, as Flower's per-node ``context.state`` holds
        it (Flower hands the ClientApp the node's context per message; the record never leaves the node)."""
        held = sorted(self._held)
        public = sorted(self._public)
        return ConfigRecord(
            {
                "index": self.index,
                "round": self.round,
                "threshold": self.threshold,
                "length": self.length,
                "neighbours": list(self.neighbours),
                "sk_c": crypto.private_bytes(self._key_c),
                "sk_s": crypto.private_bytes(self._key_s),
                "seed_b": self._seed_b,
                "public_ids": public,
                "public_c": [self._public[v][0] for v in public],
                "public_s": [self._public[v][1] for v in public],
                "held_ids": held,
                "held_b": [self._held[v][0] for v in held],
                "held_s": [self._held[v][1] for v in held],
            }
        )

    @classmethod
    def from_record(cls, saved: Mapping[str, Any]) -> SecAggClient:
        """The client :meth:`to_record` saved."""
        record: Mapping[str, Any] = saved  # the kinds to_record wrote
        client = cls(int(record["index"]))
        client.round, client.threshold, client.length = int(record["round"]), int(record["threshold"]), int(record["length"])
        client.neighbours = [int(v) for v in record["neighbours"]]
        client._key_c = crypto.private_from_bytes(bytes(record["sk_c"]))
        client._key_s = crypto.private_from_bytes(bytes(record["sk_s"]))
        client._seed_b = bytes(record["seed_b"])
        client._public = {int(v): (bytes(c), bytes(s)) for v, c, s in zip(record["public_ids"], record["public_c"], record["public_s"])}
        client._held = {int(v): (bytes(b), bytes(s)) for v, b, s in zip(record["held_ids"], record["held_b"], record["held_s"])}
        return client

    def advertise_keys(self, setup: RecordDict) -> RecordDict:
        """Stage 1: read the setup; reply with both public keys and the commitment to b."""
        f = wire.fields(setup)
        self.round, self.threshold, self.length = int(f["round"]), int(f["threshold"]), int(f["length"])
        self.neighbours = [int(v) for v in f["neighbours"]]
        return wire.message(
            {"pk_c": crypto.public_bytes(self._key_c), "pk_s": crypto.public_bytes(self._key_s), "commit_b": crypto.commitment(self._seed_b)}
        )

    def share_keys(self, keys: RecordDict) -> RecordDict:
        """Stage 2: shares of b and s for every neighbour that advertised keys (and itself), each encrypted."""
        f = wire.fields(keys)
        ids = [int(v) for v in f["ids"]]
        self._public = {v: (bytes(c), bytes(s)) for v, c, s in zip(ids, f["pk_c"], f["pk_s"])}
        holders = sorted({*ids, self.index})
        if len(holders) < self.threshold:
            raise FedlmError(f"client {self.index}: {len(holders)} share holders left, below the threshold {self.threshold}")
        b_shares = crypto.share(self._seed_b, self.threshold, len(holders))
        s_shares = crypto.share(crypto.private_bytes(self._key_s), self.threshold, len(holders))
        dst, blobs = [], []
        for holder, b_share, s_share in zip(holders, b_shares, s_shares):
            if holder == self.index:
                self._held[self.index] = (b_share, s_share)
                continue
            key = crypto.agree(self._key_c, self._public[holder][0], ENC_LABEL)
            plain = share_keys_plaintext_concat(self.index, holder, b_share, s_share)
            dst.append(holder)
            blobs.append(crypto.encrypt(key, plain, associated_data(self.round, self.index, holder)))
        return wire.message({"dst": dst, "ciphertexts": blobs})

    def masked_input(self, shares: RecordDict, codes: np.ndarray) -> RecordDict:
        """Stage 3: decrypt the shares received (a failed one is a :class:`TamperedShareError`), send the masked codes."""
        if codes.dtype != np.uint32 or codes.shape != (self.length,):
            raise ValueError(f"client {self.index}: the input must be {self.length} uint32 codes, got {codes.dtype} {codes.shape}")
        f = wire.fields(shares)
        for src, blob in zip(f["src"], f["ciphertexts"]):
            src = int(src)
            key = crypto.agree(self._key_c, self._public[src][0], ENC_LABEL)
            plain = crypto.decrypt(key, bytes(blob), associated_data(self.round, src, self.index), sender=str(src))
            got_src, got_dst, b_share, s_share = share_keys_plaintext_separate(plain)
            if (got_src, got_dst) != (src, self.index):
                raise crypto.TamperedShareError(
                    f"client {self.index}: a share claims to be from {got_src} to {got_dst}, relayed as {src} to {self.index}"
                )
            self._held[src] = (b_share, s_share)
        masked = codes + crypto.mask(self._seed_b, self.length)
        for v in sorted(self._held):
            if v != self.index:
                seed = crypto.agree(self._key_s, self._public[v][1], MASK_LABEL)
                masked += pair_mask(seed, self.length, self.index, v)
        return wire.message({}, masked)

    def unmask(self, request: RecordDict) -> RecordDict:
        """Stage 4: b shares of the survivors, s shares of the dropped; refuses an unsafe request."""
        f = wire.fields(request)
        survivors, dropped = {int(v) for v in f["survivors"]}, {int(v) for v in f["dropped"]}
        if survivors & dropped:
            raise FedlmError(f"client {self.index}: the server asked for both shares of clients {sorted(survivors & dropped)}; refused")
        if len(survivors) < self.threshold:
            raise FedlmError(f"client {self.index}: only {len(survivors)} survivors, below the threshold {self.threshold}; refused")
        ids, kinds, out = [], [], []
        for src in sorted(self._held):
            if src in survivors:
                ids.append(src)
                kinds.append(0)
                out.append(self._held[src][0])
            elif src in dropped:
                ids.append(src)
                kinds.append(1)
                out.append(self._held[src][1])
        return wire.message({"ids": ids, "kinds": kinds, "shares": out})
