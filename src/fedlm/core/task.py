"""What a client receives for a round and the client-side hook contract of an algorithm.

Shared by every layer (aggregators define hooks, the trainer runs them, runtimes carry tasks); imports nothing of
fedlm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlm.core.update import TensorDict


@dataclass(frozen=True)
class ClientContext:
    """What a trainer hook learns about the client it runs on this round.

    Attributes:
        client_id: The client's name.
        round: The round (1-based).
        extras: Tensors the server sent to this client besides the adapter (e.g. SCAFFOLD's server control
            variate c); they count as downloaded bytes.
        memory: The client's own state from its previous round (e.g. SCAFFOLD's c_i). It never leaves the
            client in a deployment; the simulation keeps it in the aggregator's state, saved in checkpoints.
        rank: The client's LoRA rank (None: the global rank), set by the server loop.
    """

    client_id: str
    round: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    memory: Mapping[str, torch.Tensor] = field(default_factory=dict)
    rank: int | None = None


@dataclass
class HookOutput:
    """What a hook adds to the client's answer: ``extras`` are uploaded, ``memory`` stays with the client."""

    extras: TensorDict = field(default_factory=dict)
    memory: TensorDict = field(default_factory=dict)


class TrainerHook:
    """Client-side part of an algorithm (FedProx's proximal term, SCAFFOLD's correction), run by the trainer.

    Hooks let an algorithm change local training without copying the trainer. The trainer calls, per client and
    round: :meth:`begin`, then per step :meth:`extra_loss` (added to the loss) and :meth:`correct_gradients`
    (after backward and gradient clipping, before the optimizer step), and finally :meth:`end`. Every default
    does nothing. A hook with ``needs_start_gradient`` gets the mean gradient at the global point over the round's
    batches (one extra forward/backward per step).
    """

    needs_start_gradient: bool = False  # a class default; a hook may set it per instance (SCAFFOLD's option I)

    def begin(self, context: ClientContext, global_params: Mapping[str, torch.Tensor]) -> None:
        """Called before the first local step."""

    def extra_loss(self, params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to the local loss at every step (None: nothing)."""
        return None

    def correct_gradients(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Change ``param.grad`` in place before the optimizer step."""

    def end(
        self,
        params: Mapping[str, torch.Tensor],
        global_params: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        start_gradient: Mapping[str, torch.Tensor] | None,
    ) -> HookOutput:
        """Called after the last local step with the local parameters; returns extras to upload and memory."""
        return HookOutput()


class NonFiniteLossError(RuntimeError):
    """A client's loss became NaN or Inf; its update is not sent."""


@dataclass(frozen=True)
class LocalPlan:
    """What the server asks of a client this round: one learning rate per optimizer step, batch size, seed,
    the client's LoRA rank (None: the global rank; components beyond it stay zero), and the LoRA factor ("A" or
    "B") it keeps fixed this round (None: both train; RoLoRA's alternating rounds)."""

    round: int
    lrs: list[float]
    batch_size: int
    seed: int
    rank: int | None = None
    frozen: str | None = None


@dataclass(frozen=True)
class ReplicaSync:
    """How a client's copy of the global model follows a broadcast downlink (``compression.downlink``, FedKSeed's
    seed lists) when the client lives on another machine: the task's state is the replica after round ``through``;
    the client rebuilds it from its own replica of round ``since`` and the ``messages`` of the rounds in between
    (``since`` None: the state travels dense). ``digest`` is the SHA-256 of the state, so a client can tell that it
    rebuilt the server's replica bit for bit; ``kind`` says how a message advances a replica ("codec" or "seeds")."""

    kind: str
    through: int
    digest: str
    since: int | None = None
    messages: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientTask:
    """Everything a client receives for a round: the plan, the adapter state to start from, algorithm extras, and
    (a broadcast downlink to clients on other machines) how the client rebuilds the state from its own replica."""

    plan: LocalPlan
    state: Mapping[str, torch.Tensor]
    context: ClientContext
    replica: ReplicaSync | None = None
