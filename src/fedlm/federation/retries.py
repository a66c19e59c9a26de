"""Round retries (``federation.round_retries``): a runtime wrapper that resends the failed clients' tasks while a
round has fewer than ``federation.min_clients`` updates."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.core.runtime import Runtime
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole


@dataclass
class RetryingRuntime:
    """Sends the failed clients' same tasks again (same seeds, so a retried client trains exactly as it would have),
    up to ``retries`` times, ``wait_s`` apart, while fewer than ``min_clients`` updates arrived. Each retry is
    logged (``split: retry``)."""

    inner: Runtime
    min_clients: int
    retries: int
    wait_s: float
    log: MetricsLog
    console: RunConsole

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """The inner runtime's results for ``tasks``, failed clients retried; in the tasks' order."""
        results = list(self.inner.train_clients(tasks))
        round_num = next(iter(tasks.values())).plan.round if tasks else 0
        for attempt in range(1, self.retries + 1):
            failed = [r.client_id for r in results if isinstance(r, ClientFailure)]
            if not failed or len(results) - len(failed) >= self.min_clients:
                break
            self.console.print(
                f"[yellow]round {round_num}: {len(results) - len(failed)} of {self.min_clients} needed updates; "
                f"retry {attempt}/{self.retries} for {', '.join(failed)}[/yellow]"
            )
            self.log.append(
                {
                    "round": round_num,
                    "split": "retry",
                    "attempt": attempt,
                    "clients": failed,
                    "reasons": {r.client_id: r.reason for r in results if isinstance(r, ClientFailure)},
                }
            )
            time.sleep(self.wait_s)
            again = {r.client_id: r for r in self.inner.train_clients({c: tasks[c] for c in failed})}
            results = [again.get(r.client_id, r) for r in results]
            order = {c: i for i, c in enumerate(tasks)}  # the tasks' order, as without a retry: float sums do not commute
            results.sort(key=lambda r: order.get(r.client_id, len(order)))
        return results
