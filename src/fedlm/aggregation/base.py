"""The aggregator contract and the registry of aggregators by name.

An aggregator turns the current global trainable tensors and the round's accepted client updates (deltas) into
the next global tensors. Math lives in pure functions in each algorithm's file; the class only adapts the
contract and keeps state (``state_dict``/``load_state_dict``, saved in every checkpoint).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fedlm.core.params import validate_params
from fedlm.core.registry import Registry
from fedlm.core.task import ClientContext, TrainerHook
from fedlm.core.update import ClientUpdate, TensorDict


class AggregatorParams(BaseModel):
    """Parameters of an aggregator, given beside ``aggregation.name``; subclasses add fields."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ByzantineBound:
    """How many attackers a robust aggregator bounds: f of the K updates of a round when K > 2f + ``margin``.

    Attributes:
        margin: 2 for Krum (K > 2f + 2), 0 for an honest majority (K > 2f: median, trimmed mean).
        source: The paper the bound comes from, cited in the refusal.
        assumed_param: The aggregator's parameter giving the f it assumes (Krum's ``num_malicious``), if any.
    """

    margin: int
    source: str
    assumed_param: str | None = None

    def holds(self, updates: int, attackers: int) -> bool:
        """Whether ``attackers`` of ``updates`` updates per round are within the bound."""
        return updates > 2 * attackers + self.margin

    def formula(self, attackers: int) -> str:
        """The bound written out for a message: ``K > 2f + 2 = 8`` (or ``K > 2f = 6`` for an honest majority)."""
        rhs = f"2f + {self.margin}" if self.margin else "2f"
        return f"K > {rhs} = {2 * attackers + self.margin}"


@dataclass
class AggregationResult:
    """The next global tensors and what the server should log about this step.

    Attributes:
        params: The next global tensors (in the LoRA mode's space).
        metrics: Scalars about the step (norms, errors, ...).
        excluded: Clients whose update a robust aggregator left out this round.
        client_weights: Each client's effective weight in the step, where an aggregator re-weights clients.
    """

    params: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    client_weights: dict[str, float] = field(default_factory=dict)


class Aggregator(ABC):
    """Base class of every server aggregator."""

    name: ClassVar[str]
    Params: ClassVar[type[AggregatorParams]] = AggregatorParams
    #: True when K identical updates Delta give ``params + Delta`` (FedAvg-like). Adaptive optimisers document
    #: their fixed point instead (every aggregator: zero updates leave the parameters unchanged).
    returns_mean_update: ClassVar[bool] = True
    #: True when the algorithm keeps state in the trainable-parameter space across rounds (SCAFFOLD's control
    #: variates), which a LoRA mode that re-factorises A and B every round (``exact``) cannot honour.
    needs_stable_parameter_space: ClassVar[bool] = False
    #: True when the algorithm needs the server's own update on a root dataset each round (FLTrust); the server
    #: loop then calls :meth:`set_server_update` before :meth:`aggregate`.
    needs_server_update: ClassVar[bool] = False
    #: Why the algorithm must see each client's own update, or None when a sum (or mean) of the updates is enough.
    #: Client DP (one noised sum) and secure aggregation (only the sum) refuse an algorithm that sets it.
    needs_individual_updates: ClassVar[str | None] = None
    #: What clients upload beside their delta (SCAFFOLD's control-variate changes), or None. Neither client DP nor
    #: secure aggregation protects it, so both refuse an algorithm that sets it.
    uploads_extras: ClassVar[str | None] = None
    #: True when the step is exactly params + sum_k p_k Delta_k with p_k = n_k / n and no state (FedAvg): a step that
    #: is linear in the updates, so FedKSeed can write it per seed (``federation.fedkseed.downlink: seeds``).
    example_weighted_mean: ClassVar[bool] = False
    #: The attacker share a robust aggregator bounds, or None for an algorithm that makes no Byzantine claim.
    byzantine_bound: ClassVar[ByzantineBound | None] = None

    def __init__(self, params: AggregatorParams) -> None:
        self.params = params

    @abstractmethod
    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """The next global tensors from the current ones and a non-empty list of accepted updates."""

    def check_config(self, config: Any) -> None:  # noqa: B027 - a hook: the default accepts every config
        """Refuse (with :class:`FedlmError`) an experiment config this algorithm cannot honour; default accepts all.

        ``config`` is the :class:`fedlm.config.ExperimentConfig`; called at config load.
        """

    def set_server_update(self, update: ClientUpdate) -> None:
        """Receive this round's server update (in the LoRA mode's space); only for ``needs_server_update``."""
        raise TypeError(f"aggregator {self.name!r} does not use a server update (needs_server_update is False)")

    def start(self, client_names: Sequence[str]) -> None:  # noqa: B027 - a hook: the default needs no names
        """Learn the federation (all client names) before the first round; the default ignores it."""

    def trainer_hooks(self) -> list[TrainerHook]:
        """Client-side hooks this algorithm needs (none for plain averaging)."""
        return []

    def client_context(self, client_id: str, round_num: int) -> ClientContext:
        """What this algorithm sends to (``extras``) and keeps for (``memory``) ``client_id`` this round."""
        return ClientContext(client_id, round_num)

    def state_dict(self) -> dict[str, Any]:
        """Server state to checkpoint (momentum buffers, moments, ...); empty for stateless algorithms."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"aggregator {self.name!r} is stateless but got state keys {sorted(state)}")


AGGREGATORS: Registry[type[Aggregator]] = Registry(
    "aggregator",
    "aggregation.name",
    builtin=[
        f"fedlm.aggregation.{module}"
        for module in (
            "fedavg",
            "fedavgm",
            "fedprox",
            "scaffold",
            "fedadagrad",
            "fedadam",
            "fedyogi",
            "robust.median",
            "robust.trimmed_mean",
            "robust.krum",
            "robust.norm_bound",
            "robust.flame",
            "robust.fltrust",
        )
    ],
)
"""Every aggregator by its ``aggregation.name``; a module registers its class with :func:`register_aggregator`."""


def register_aggregator(name: str) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator: make an aggregator available as ``aggregation.name: <name>``."""

    def decorate(cls: type[Aggregator]) -> type[Aggregator]:
        cls.name = name
        return AGGREGATORS.register(name, cls)

    return decorate


def registered_aggregators() -> list[str]:
    """Names of every registered aggregator, sorted."""
    return AGGREGATORS.names()


def aggregator_class(name: str) -> type[Aggregator]:
    """The class registered as ``aggregation.name: <name>`` (its capabilities are class attributes)."""
    return AGGREGATORS.get(name)


def build_aggregator(name: str, params: Mapping[str, Any]) -> Aggregator:
    """Instantiate the aggregator ``name`` with its parameters, refusing unknown names and parameters."""
    cls = AGGREGATORS.get(name)
    return cls(validate_params(cls.Params, params, "aggregation", "aggregator", name))
