"""What every config rule judges (:class:`Setting`), the rule type, and the field names rules share in messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from fedlm.aggregation.base import Aggregator, build_aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.privacy.ledger import PrivacyLedger
from fedlm.privacy.setup import dp_account

SECAGG = "privacy.secure_aggregation"
NODE_LOCAL = "with `partition.method: node_local` (each client's data stays on its SuperNode; the server has none)"


@dataclass
class Setting:
    """What a rule judges: the config, the number of clients when known, and the configured aggregator (built on
    first use, so an unknown ``aggregation.name`` is reported by the first rule that needs it)."""

    config: ExperimentConfig
    num_clients: int | None = None
    client_names: Sequence[str] = field(default_factory=list)

    @cached_property
    def aggregator(self) -> Aggregator:
        agg = self.config.aggregation
        return build_aggregator(agg.name, agg.params())

    @cached_property
    def dp_account(self) -> PrivacyLedger | None:
        """Client DP's accounting (its noise multiplier solved for a target epsilon), once per setting."""
        if self.config.privacy.client_dp is None or self.num_clients is None:
            return None
        return dp_account(self.config, self.num_clients)

    @property
    def per_round(self) -> int | None:
        """Clients per round: ``federation.clients_per_round``, else all of them (None while unknown)."""
        return self.config.federation.clients_per_round or self.num_clients


Rule = Callable[[Setting], None]


def known_num_clients(config: ExperimentConfig) -> int | None:
    """The number of clients when the config alone tells it (``partition.clients`` or ``partition.num_clients``)."""
    return len(config.partition.clients) if config.partition.clients is not None else config.partition.num_clients
