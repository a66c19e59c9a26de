"""The server loop: sample clients, have the runtime train them, validate, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedlm.aggregation.base import Aggregator
from fedlm.aggregation.lora.mode import LoraMode, truncation_error
from fedlm.aggregation.lora_structure import wire_form
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.runtime import Runtime
from fedlm.core.sampling import sample_clients
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate, TensorDict
from fedlm.evaluation.evaluator import Evaluator
from fedlm.federation.checkpoint import Checkpoint, save_checkpoint
from fedlm.federation.schedule import lr_at
from fedlm.federation.validation import Expectations, split_valid
from fedlm.federation.wire import serialized_bytes
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.progress import RunConsole
from fedlm.reporting.run_dir import RunDir

if TYPE_CHECKING:
    from fedlm.privacy.secagg.round import SecureAggregation


def round_lrs(config: ExperimentConfig, round_num: int) -> list[float]:
    """Per-step learning rates of round ``round_num`` (1-based) on the schedule over all rounds' local steps."""
    fed = config.federation
    total = fed.rounds * fed.local_steps
    first = (round_num - 1) * fed.local_steps
    return [
        lr_at((first + s) / total, base_lr=fed.lr, schedule=fed.lr_schedule, min_lr_ratio=fed.min_lr_ratio)
        for s in range(fed.local_steps)
    ]


class EpsilonAccount(Protocol):
    """Differential-privacy accounting of a run: epsilon at ``delta`` after a number of rounds."""

    delta: float

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds."""
        ...


SERVER_ID = "__server__"  # the client id of the server's own (root-set) update


class Probe(Protocol):
    """An extra evaluation run with every evaluation (e.g. a backdoor's attack success)."""

    def evaluate(self, state: TensorDict, round_num: int) -> list[dict[str, Any]]:
        """``metrics.jsonl`` records for ``state`` at ``round_num``."""
        ...


def attack_outcome(chosen: Sequence[str], attackers: frozenset[str], failures: Sequence[ClientFailure], excluded: Sequence[str]) -> dict[str, Any]:
    """Which attackers took part this round and what the defences caught: true and false positives."""
    left_out = set(excluded) | {f.client_id for f in failures if f.reason.startswith("rejected")}
    return {
        "malicious": sorted(set(chosen) & attackers),
        "excluded_malicious": sorted(left_out & attackers),
        "excluded_honest": sorted(left_out - attackers),
    }


@dataclass
class ServerLoop:
    """Runs rounds ``start+1 .. federation.rounds`` and returns the final global adapter state."""

    config: ExperimentConfig
    config_yaml: str
    client_names: list[str]
    runtime: Runtime
    aggregator: Aggregator
    evaluator: Evaluator
    run_dir: RunDir
    log: MetricsLog
    console: RunConsole
    lora: LoraMode
    client_ranks: dict[str, int | None]
    attackers: frozenset[str] = frozenset()
    probes: list[Probe] = field(default_factory=list)
    server_trainer: Callable[[TensorDict, LocalPlan], ClientUpdate] | None = None
    dp_account: EpsilonAccount | None = None
    # audit: sees (round, each client's start state, accepted updates) every round (fedlm.privacy.client_models)
    update_observer: Callable[[int, dict[str, Any], list[ClientUpdate]], None] | None = None
    # privacy.secure_aggregation: the round's clients run SecAgg+ and the aggregator gets only their sum
    secure_aggregation: SecureAggregation | None = None

    def run(self, state: TensorDict, start_round: int) -> TensorDict:
        """Train from ``state`` after round ``start_round`` (0 for a new run)."""
        rounds = self.config.federation.rounds
        if start_round == 0 and self.config.eval.at_start:
            self.evaluate(state, 0)
        for round_num in range(start_round + 1, rounds + 1):
            state = self.run_round(state, round_num)
            if self._eval_due(round_num):
                self.evaluate(state, round_num)
            if round_num % self.config.federation.checkpoint_every == 0 or round_num == rounds:
                self.checkpoint(state, round_num)
        return state

    def run_round(self, state: TensorDict, round_num: int) -> TensorDict:
        """One round: the clients' updates, validated and aggregated (or the round skipped)."""
        fed = self.config.federation
        chosen = sample_clients(self.client_names, fed.clients_per_round, self.config.seed, round_num)
        lrs = round_lrs(self.config, round_num)
        tasks = {c: self._task(c, state, round_num, lrs) for c in chosen}
        started = time.perf_counter()
        results = self._train_with_retries(tasks, round_num)
        updates = [r for r in results if isinstance(r, ClientUpdate)]
        failures = [r for r in results if isinstance(r, ClientFailure)]
        traffic = self._traffic(state, tasks, updates)
        expect = Expectations(round_num, state, set(chosen), set(self.client_names), fed.max_num_examples)
        accepted, rejected = split_valid(updates, expect)
        failures += rejected
        if self.update_observer is not None:  # audit: save clients' local models (fedlm.privacy.client_models)
            self.update_observer(round_num, {c: t.state for c, t in tasks.items()}, accepted)
        aggregate_started = time.perf_counter()
        secure = None
        if self.secure_aggregation is not None and len(accepted) >= fed.min_clients:  # clients mask; server sees a sum
            secure = self.secure_aggregation.aggregate(self.aggregator, self.lora.to_server_space(state, [], {}, {})[0], accepted, chosen, round_num)
            for client, row in traffic.items():  # the masked vector and the protocol messages replace the plain upload
                row["upload_bytes"] = secure.upload_bytes.get(client, 0)
                row["download_bytes"] += secure.download_bytes.get(client, 0)
        for update in accepted:
            self.log.append({"round": round_num, "split": "train", "client": update.client_id, "num_examples": update.num_examples,
                             "rank": tasks[update.client_id].plan.rank or self.lora.full_rank, **traffic[update.client_id], **update.metrics})
        skipped = len(accepted) < fed.min_clients
        if not accepted and failures and not all(f.unreachable for f in failures):
            raise FedlmError(f"round {round_num}: no client produced a usable update; first reason: {failures[0].reason}")
        metrics: dict[str, Any] = {}
        if not skipped and secure is not None:
            metrics.update(secure.metrics)
            skipped = secure.result is None  # the protocol aborted: too many dropouts, or a tampered share
        if not skipped:
            if secure is not None and secure.result is not None:
                result = secure.result
            else:
                starts = {c: task.state for c, task in tasks.items()}
                space, space_updates = self.lora.to_server_space(state, accepted, starts, self.client_ranks)
                if self.aggregator.needs_server_update:
                    metrics["server_loss"] = self._server_update(state, round_num, lrs)
                result = self.aggregator.aggregate(space, space_updates)
            state, lora_metrics = self.lora.from_server_space(result.params, state)
            metrics = {**metrics, **result.metrics, **lora_metrics}
            if result.excluded:
                metrics["excluded"] = list(result.excluded)
            if result.client_weights:
                metrics["client_weights"] = dict(result.client_weights)
        metrics["aggregate_time_s"] = time.perf_counter() - aggregate_started  # the server's cost (a defence's price)
        train_time = time.perf_counter() - started
        if self.dp_account is not None:  # every sampled round is spent, aggregated or skipped
            metrics["epsilon"] = self.dp_account.epsilon_after(round_num)
            metrics["delta"] = self.dp_account.delta
        self._log_round(round_num, chosen, accepted, failures, skipped, train_time, traffic, metrics)
        return state

    def _train_with_retries(self, tasks: dict[str, ClientTask], round_num: int) -> list[ClientUpdate | ClientFailure]:
        """The runtime's results for ``tasks``; while fewer than ``federation.min_clients`` updates arrived, the failed
        clients' same tasks (same seeds, so a retried client trains exactly as it would have) are sent again, up to
        ``federation.round_retries`` times, ``federation.retry_wait_s`` apart. Each retry is logged (``split: retry``)."""
        fed = self.config.federation
        results = self.runtime.train_clients(tasks)
        for attempt in range(1, fed.round_retries + 1):
            failed = [r.client_id for r in results if isinstance(r, ClientFailure)]
            if not failed or len(results) - len(failed) >= fed.min_clients:
                break
            self.console.print(f"[yellow]round {round_num}: {len(results) - len(failed)} of {fed.min_clients} needed updates; "
                               f"retry {attempt}/{fed.round_retries} for {', '.join(failed)}[/yellow]")
            self.log.append({"round": round_num, "split": "retry", "attempt": attempt, "clients": failed,
                             "reasons": {r.client_id: r.reason for r in results if isinstance(r, ClientFailure)}})
            time.sleep(fed.retry_wait_s)
            again = {r.client_id: r for r in self.runtime.train_clients({c: tasks[c] for c in failed})}
            results = [again.get(r.client_id, r) for r in results]
            order = {c: i for i, c in enumerate(tasks)}  # the tasks' order, as without a retry: float sums do not commute
            results.sort(key=lambda r: order.get(r.client_id, len(order)))
        return results

    def _server_update(self, state: TensorDict, round_num: int, lrs: list[float]) -> float:
        """Train on the server's root set from the global state (FLTrust's g_0) and hand it to the aggregator."""
        if self.server_trainer is None:
            raise FedlmError(f"`aggregation.name: {self.config.aggregation.name}` needs a server root set, and this runtime has none")
        plan = LocalPlan(round_num, lrs, self.config.federation.batch_size, derive_seed(self.config.seed, "server-root", round_num))
        update = self.server_trainer(state, plan)
        _, (mapped,) = self.lora.to_server_space(state, [update], {SERVER_ID: state}, {})
        self.aggregator.set_server_update(mapped)
        return float(update.metrics["loss"])

    def _task(self, client_id: str, state: TensorDict, round_num: int, lrs: list[float]) -> ClientTask:
        """What ``client_id`` downloads this round: its plan, the global adapter cut to its rank, the extras."""
        rank = self.client_ranks.get(client_id)
        seed = derive_seed(self.config.seed, "local", round_num, client_id)
        plan = LocalPlan(round_num, lrs, self.config.federation.batch_size, seed, rank)
        context = dataclasses.replace(self.aggregator.client_context(client_id, round_num), rank=rank)
        return ClientTask(plan, self.lora.download(state, rank), context)

    def _traffic(self, state: TensorDict, tasks: dict[str, ClientTask], updates: Sequence[ClientUpdate]) -> dict[str, dict[str, float]]:
        """Bytes each client downloaded and uploaded, serialised as they would travel (cut to the client's rank)."""
        traffic: dict[str, dict[str, float]] = {}
        errors: dict[int | None, float] = {}
        for client_id, task in tasks.items():
            rank = task.plan.rank
            if rank not in errors:
                errors[rank] = truncation_error(state, rank)
            traffic[client_id] = {"download_bytes": serialized_bytes(wire_form(task.state, rank), wire_form(task.context.extras, rank)),
                                  "upload_bytes": 0, "download_truncation_error": errors[rank]}
        for update in updates:
            if update.client_id in traffic:
                rank = tasks[update.client_id].plan.rank
                traffic[update.client_id]["upload_bytes"] += serialized_bytes(wire_form(update.tensors, rank), wire_form(update.extras, rank))
        return traffic

    def evaluate(self, state: TensorDict, round_num: int) -> None:
        """Evaluate ``state``, log its records and save the predictions of this round."""
        result = self.evaluator.evaluate(state, round_num)
        for record in result.records:
            self.log.append(record)
        self.run_dir.predictions.mkdir(parents=True, exist_ok=True)
        path = self.run_dir.predictions / f"round_{round_num:04d}.jsonl"
        path.write_text("".join(json.dumps(row, default=str) + "\n" for row in result.predictions))
        for probe in self.probes:
            for record in probe.evaluate(state, round_num):
                self.log.append(record)
        glob = result.records[0]
        shown = ", ".join(f"{k} {glob[k]:.4f}" for k in ("loss", "perplexity", "rouge_l", "exact_match", "preference_accuracy", "reward_margin") if k in glob)
        self.console.print(f"round {round_num}: global test {shown}")

    def checkpoint(self, state: TensorDict, round_num: int) -> None:
        """Save a resumable checkpoint after ``round_num``."""
        ckpt = Checkpoint(round_num, state, self.aggregator.state_dict(), {"seed": self.config.seed})
        save_checkpoint(self.run_dir.checkpoints, ckpt, self.config_yaml, self.config.federation.keep_checkpoints)

    def _eval_due(self, round_num: int) -> bool:
        every = self.config.eval.every
        return round_num == self.config.federation.rounds or (every > 0 and round_num % every == 0)

    def _log_round(
        self,
        round_num: int,
        chosen: Sequence[str],
        accepted: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
        skipped: bool,
        train_time: float,
        traffic: dict[str, dict[str, float]],
        metrics: dict[str, Any],
    ) -> None:
        for failure in failures:
            self.console.print(f"[yellow]round {round_num}: client {failure.client_id} left out: {failure.reason}[/yellow]")
        mean_loss = sum(u.metrics["loss"] for u in accepted) / max(len(accepted), 1)
        down = sum(t["download_bytes"] for t in traffic.values())
        up = sum(t["upload_bytes"] for t in traffic.values())
        record: dict[str, Any] = {
            "round": round_num,
            "split": "aggregate",
            "client": None,
            "clients": list(chosen),
            "num_updates": len(accepted),
            "rejected": [{"client": f.client_id, "reason": f.reason} for f in failures],
            "skipped": skipped,
            "train_loss": mean_loss if accepted else None,
            "train_time_s": train_time,
            "download_bytes": down,
            "upload_bytes": up,
            "aggregation": metrics,
        }
        if self.attackers:
            record["attack"] = attack_outcome(chosen, self.attackers, failures, metrics.get("excluded", []))
        self.log.append(record)
        note = (f" (skipped: {metrics['secagg_aborted']})" if "secagg_aborted" in metrics
                else " (skipped: too few valid updates)" if skipped else "")
        svd = f", svd error {metrics['svd_rel_error']:.3g}" if "svd_rel_error" in metrics else ""
        self.console.print(
            f"round {round_num}/{self.config.federation.rounds}: {len(accepted)} updates, train loss {mean_loss:.4f}, "
            f"{(down + up) / 2**20:.1f} MiB moved, {train_time:.1f}s{svd}{note}"
        )
