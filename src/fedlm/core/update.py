"""What travels from a client to the server: the update, or the reason there is none."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """A client's contribution to one round.

    Attributes:
        client_id: The client's name (partition client name).
        round: The round this update answers (1-based).
        num_examples: The client's training-set size, the FedAvg weight n_k.
        tensors: The delta ``local - global`` of every trainable tensor, by adapter state-dict name (float32).
        metrics: Client-side training metrics (``loss``, ``steps``, ``lr``, ...).
        extras: Algorithm tensors uploaded beside the delta (e.g. SCAFFOLD's Delta c_i), by name.
        memory: State the client keeps for its next round (e.g. SCAFFOLD's c_i); never uploaded in a deployment,
            carried back to the aggregator's per-client store in the simulation.
    """

    client_id: str
    round: int
    num_examples: int
    tensors: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)
    extras: TensorDict = field(default_factory=dict)
    memory: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class ClientFailure:
    """A client that sent no usable update this round, and why (logged in ``metrics.jsonl``)."""

    client_id: str
    round: int
    reason: str
    unreachable: bool = False  # no reply at all (a node died, timed out or has no SuperNode), not a failed training
