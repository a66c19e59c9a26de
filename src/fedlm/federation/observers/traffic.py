"""Bytes each client downloaded and uploaded in a round, serialised as they would travel (cut to the client's
rank); under secure aggregation the protocol's messages replace the plain upload."""

from __future__ import annotations

from fedlm.aggregation.lora.mode import truncation_error
from fedlm.aggregation.lora_structure import wire_form
from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.federation.wire import serialized_bytes


class TrafficMeter(RoundObserver):
    """Fills ``record.traffic``: per client ``download_bytes``, ``upload_bytes`` (every update received, valid or
    not) and ``download_truncation_error`` (what cutting the global adapter to the client's rank lost)."""

    def on_round(self, record: RoundRecord) -> None:
        traffic: dict[str, dict[str, float]] = {}
        errors: dict[int | None, float] = {}
        for client_id, task in record.tasks.items():
            rank = task.plan.rank
            if rank not in errors:
                errors[rank] = truncation_error(record.start_state, rank)
            traffic[client_id] = {
                "download_bytes": serialized_bytes(wire_form(task.state, rank), wire_form(task.context.extras, rank)),
                "upload_bytes": 0,
                "download_truncation_error": errors[rank],
            }
        for update in record.received:
            if update.client_id in traffic:
                rank = record.tasks[update.client_id].plan.rank
                traffic[update.client_id]["upload_bytes"] += serialized_bytes(wire_form(update.tensors, rank), wire_form(update.extras, rank))
        if record.protocol_bytes is not None:  # the masked vector and the protocol messages replace the plain upload
            for client, row in traffic.items():
                upload, download = record.protocol_bytes.get(client, (0, 0))
                row["upload_bytes"] = upload
                row["download_bytes"] += download
        record.traffic = traffic
