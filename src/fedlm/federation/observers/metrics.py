"""The round's records in ``metrics.jsonl`` (one ``train`` record per accepted update, one ``aggregate`` record)
and its line on the console."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole


@dataclass
class RoundLogger(RoundObserver):
    """Writes what the round and the observers before it recorded."""

    log: MetricsLog
    console: RunConsole
    rounds: int
    full_rank: int | None  # the rank logged for clients at the global rank

    def on_round(self, record: RoundRecord) -> None:
        for update in record.accepted:
            self.log.append(
                {
                    "round": record.round,
                    "split": "train",
                    "client": update.client_id,
                    "num_examples": update.num_examples,
                    "rank": record.tasks[update.client_id].plan.rank or self.full_rank,
                    **record.traffic.get(update.client_id, {}),
                    **update.metrics,
                }
            )
        for failure in record.failures:
            self.console.print(f"[yellow]round {record.round}: client {failure.client_id} left out: {failure.reason}[/yellow]")
        accepted, metrics = record.accepted, record.metrics
        mean_loss = sum(u.metrics["loss"] for u in accepted) / max(len(accepted), 1)
        down = sum(t["download_bytes"] for t in record.traffic.values())
        up = sum(t["upload_bytes"] for t in record.traffic.values())
        entry: dict[str, Any] = {
            "round": record.round,
            "split": "aggregate",
            "client": None,
            "clients": list(record.chosen),
            "num_updates": len(accepted),
            "rejected": [{"client": f.client_id, "reason": f.reason} for f in record.failures],
            "skipped": record.skipped,
            "train_loss": mean_loss if accepted else None,
            "train_time_s": record.train_time_s,
            "download_bytes": down,
            "upload_bytes": up,
            "aggregation": metrics,
            **record.fields,
        }
        self.log.append(entry)
        note = (
            f" (skipped: {metrics['secagg_aborted']})"
            if "secagg_aborted" in metrics
            else " (skipped: too few valid updates)"
            if record.skipped
            else ""
        )
        svd = f", svd error {metrics['svd_rel_error']:.3g}" if "svd_rel_error" in metrics else ""
        self.console.print(
            f"round {record.round}/{self.rounds}: {len(accepted)} updates, train loss {mean_loss:.4f}, "
            f"{(down + up) / 2**20:.1f} MiB moved, {record.train_time_s:.1f}s{svd}{note}"
        )
