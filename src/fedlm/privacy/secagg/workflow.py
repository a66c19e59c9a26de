"""One SecAgg+ round as the server drives it, whatever carries the messages (Bell et al. 2020, Algorithm 1;
Bonawitz et al. 2017, Fig. 4: rounds 0-4).

The server's steps are :class:`~fedlm.privacy.secagg.server.SecAggServer`'s; a :class:`Channel` takes each stage's
outgoing messages (client index -> ``RecordDict``) to the clients and brings back the replies of those that answered.
The simulation's channel calls :class:`~fedlm.privacy.secagg.client.SecAggClient` objects in this process
(:mod:`~fedlm.privacy.secagg.simulate`); the Flower channel sends Flower messages to SuperNodes, whose ClientApp
runs the same ``SecAggClient`` (:mod:`fedlm.runtime.flower.secagg_server`). A client that does not answer a stage
(dead, excluded for a malformed reply) has dropped out from that stage on; the server recovers as the protocol says.

The stages are split where a deployment's round needs them split: :func:`key_stages` and :func:`masked_stage` run
where the clients train (the masked input is sent with the trained update's codes), :func:`unmask_stage` where the
server aggregates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
from flwr.common import RecordDict

from fedlm.privacy.secagg.server import SecAggServer

STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")


class Channel(Protocol):
    """Carries one stage's messages from the server to the clients and returns the replies that came back."""

    def exchange(self, stage: str, outbox: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        """Send ``outbox[u]`` to client ``u`` for ``stage``; the valid replies by client index."""
        ...


def key_stages(server: SecAggServer, channel: Channel) -> dict[int, RecordDict]:
    """Rounds 0-2: setup and key advertisement, then the encrypted shares; returns each sharer's inbox of shares
    (the outgoing messages of the masked-input stage). Raises ``SecAggAbort`` below the threshold."""
    keys = channel.exchange("advertise_keys", server.setup_messages())
    shares = channel.exchange("share_keys", server.broadcast_keys(keys))
    return server.route_shares(shares)


def masked_stage(server: SecAggServer, channel: Channel, inboxes: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
    """Round 3: collect the masked inputs; returns the unmask requests (round 4's outgoing messages)."""
    return server.unmask_requests(channel.exchange("masked_input", inboxes))


def unmask_stage(server: SecAggServer, channel: Channel, requests: Mapping[int, RecordDict]) -> np.ndarray:
    """Round 4: the shares that remove the masks; returns the modular sum of the survivors' inputs (uint32)."""
    return server.unmask(channel.exchange("unmask", requests))
