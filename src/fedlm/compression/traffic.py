"""What a compressed message costs on the wire, written into the round's traffic record."""

from __future__ import annotations

from typing import Literal

from fedlm.core.round import RoundRecord


def record_sizes(record: RoundRecord, sizes: dict[tuple[int, str], int], direction: Literal["upload", "download"]) -> dict[tuple[int, str], int]:
    """Replace each client's ``{direction}_bytes`` in ``record.traffic`` by the encoded size measured for this round in
    ``sizes`` (keyed by (round, client)), keeping the dense size beside it as ``dense_{direction}_bytes``; returns the
    sizes of later rounds (this round's are used up)."""
    for client, row in record.traffic.items():
        size = sizes.get((record.round, client))
        if size is not None:
            row[f"dense_{direction}_bytes"] = row[f"{direction}_bytes"]
            row[f"{direction}_bytes"] = size
    return {key: size for key, size in sizes.items() if key[0] > record.round}
