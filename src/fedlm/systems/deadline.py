"""Round deadlines (``federation.round_deadline_s``, simulated seconds): a runtime wrapper that gives each client
only the local steps that fit before the deadline on its device, dropping it (``late_clients: drop``) or taking its
partial work (``partial``). Partial updates are rescaled as in FedNova (Wang et al. 2020, eq. 6-7): client i's
delta is divided by its step count tau_i and multiplied by tau_eff = sum_i p_i tau_i (p_i = n_i / sum n), so that a
weighted mean of the rescaled deltas is FedNova's normalised update and clients that took fewer steps are not
under-weighted in direction, nor the fast ones over-weighted.

The server decides the steps before training from the bytes the client downloads and the bytes its dense update
will upload (the same size as the adapter it answers: with uplink compression the real upload is smaller, so the
client finishes earlier than planned, never later).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlm.aggregation.lora_structure import wire_form
from fedlm.core.runtime import Runtime
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.federation.wire import serialized_bytes
from fedlm.systems.clock import DEADLINE_REASON, transfer_seconds
from fedlm.systems.profiles import DeviceProfile


def steps_within(profile: DeviceProfile, deadline_s: float, download_bytes: float, upload_bytes: float, planned: int) -> int:
    """How many of the ``planned`` local steps fit before ``deadline_s`` after the download and before the upload
    (0 when even the transfers do not fit)."""
    left = deadline_s - transfer_seconds(download_bytes, profile.downlink_mbps) - transfer_seconds(upload_bytes, profile.uplink_mbps)
    if left <= 0:
        return 0
    return min(planned, math.floor(left * profile.steps_per_s + 1e-9))


def fednova_scales(steps: Mapping[str, int], num_examples: Mapping[str, int]) -> dict[str, float]:
    """FedNova's factor tau_eff / tau_i per client (Wang et al. 2020): tau_eff = sum_i p_i tau_i, p_i = n_i / sum n."""
    total = sum(num_examples[c] for c in steps)
    tau_eff = sum(num_examples[c] / total * tau for c, tau in steps.items())
    return {c: tau_eff / tau for c, tau in steps.items()}


def task_bytes(task: ClientTask) -> tuple[int, int]:
    """(download, planned dense upload) bytes of ``task``: the adapter and extras it carries, cut to its rank."""
    rank = task.plan.rank
    size = serialized_bytes(wire_form(task.state, rank), wire_form(task.context.extras, rank))
    return size, size


@dataclass
class DeadlineRuntime:
    """Cuts each task to the steps that fit before the deadline on the client's device; a client with none (or, under
    ``drop``, fewer than planned) is a :class:`ClientFailure` whose reason starts with :data:`DEADLINE_REASON`."""

    inner: Runtime
    profiles: Mapping[str, DeviceProfile]
    deadline_s: float
    partial: bool
    fednova: bool

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> Sequence[ClientUpdate | ClientFailure]:
        """The inner runtime's results for the tasks that fit, failures for the late clients; in the tasks' order."""
        cut: dict[str, ClientTask] = {}
        late: dict[str, ClientFailure] = {}
        for client, task in tasks.items():
            planned = len(task.plan.lrs)
            fit = steps_within(self.profiles[client], self.deadline_s, *task_bytes(task), planned)
            if fit == planned:
                cut[client] = task
            elif fit > 0 and self.partial:
                cut[client] = dataclasses.replace(task, plan=dataclasses.replace(task.plan, lrs=task.plan.lrs[:fit]))
            else:
                reason = f"{DEADLINE_REASON} ({self.deadline_s:g} s): {fit} of its {planned} steps fit on its device"
                late[client] = ClientFailure(client, task.plan.round, reason)
        results = {r.client_id: r for r in self.inner.train_clients(cut)} if cut else {}
        if self.partial and self.fednova:
            results = self._normalised(results, {c: len(t.plan.lrs) for c, t in cut.items()})
        return [results.get(c) or late[c] for c in tasks if c in results or c in late]

    @staticmethod
    def _normalised(results: Mapping[str, ClientUpdate | ClientFailure], steps: Mapping[str, int]) -> dict[str, ClientUpdate | ClientFailure]:
        """The updates rescaled by FedNova's tau_eff / tau_i over the clients that sent one."""
        updates = {c: r for c, r in results.items() if isinstance(r, ClientUpdate)}
        if not updates:
            return dict(results)
        scales = fednova_scales({c: steps[c] for c in updates}, {c: u.num_examples for c, u in updates.items()})
        out: dict[str, ClientUpdate | ClientFailure] = dict(results)
        for client, update in updates.items():
            if scales[client] != 1.0:
                tensors = {name: t * scales[client] for name, t in update.tensors.items()}
                out[client] = dataclasses.replace(update, tensors=tensors, metrics={**update.metrics, "fednova_scale": scales[client]})
        return out
