"""Each client's LoRA rank from ``peft.client_ranks`` (a list in client order, or a mapping by client name)."""

from __future__ import annotations

from collections.abc import Sequence

from fedlm.core.errors import FedlmError


def resolve_client_ranks(ranks: list[int] | dict[str, int] | None, client_names: Sequence[str], full_rank: int) -> dict[str, int | None]:
    """Client name -> rank (None for the global rank ``full_rank``), refusing a list or mapping that does not fit."""
    if ranks is None:
        return {name: None for name in client_names}
    if isinstance(ranks, list):
        if len(ranks) != len(client_names):
            raise FedlmError(
                f"`peft.client_ranks` has {len(ranks)} entries but the federation has {len(client_names)} clients "
                f"({', '.join(client_names)}); give one rank per client, in this order"
            )
        pairs = dict(zip(client_names, ranks))
    else:
        unknown = sorted(set(ranks) - set(client_names))
        if unknown:
            raise FedlmError(f"`peft.client_ranks` names unknown clients {unknown}; the clients are {list(client_names)}")
        pairs = {name: ranks.get(name, full_rank) for name in client_names}
    return {name: (None if rank >= full_rank else rank) for name, rank in pairs.items()}
