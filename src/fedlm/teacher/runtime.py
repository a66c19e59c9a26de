"""The teacher on the client side of a round: a runtime wrapper that, before a client trains, gets the teacher's
answers to its prompts (own ones under ``mode: label``, DP-synthesised ones under ``mode: synthetic``; from the
cache when asked before) and hands the trainer pairs of (own example, taught example) with the mixed loss of
:mod:`fedlm.teacher.kd`. A teacher that stays unreachable or failing fails that client's round (a
:class:`ClientFailure` naming the endpoint and status); the round goes on with the others, as for any failed client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlm.core.errors import FedlmError
from fedlm.core.runtime import Runtime
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientTask
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.data.formats import Message
from fedlm.runtime.simulation import SimulationRuntime
from fedlm.teacher.audit import TeacherAudit
from fedlm.teacher.cache import ResponseCache, request_key
from fedlm.teacher.client import Answer, Rejected, TeacherClient, TeacherEndpoint
from fedlm.teacher.kd import TeacherObjective, TeacherPair
from fedlm.teacher.labeling import ClientRecords, TaughtExample, Teaching, client_records
from fedlm.teacher.synthetic import PromptGenerator, SyntheticPrompts, make_synthetic_prompts, prompt_messages

if TYPE_CHECKING:
    from fedlm.config.schema import ExperimentConfig
    from fedlm.experiment import Session
    from fedlm.reporting.run_dir import RunDir

SYNTHETIC_FILE = "teacher_synthetic.json"


def endpoint_of(config: ExperimentConfig) -> TeacherEndpoint:
    """The configured endpoint and the sampling parameters sent with every request."""
    t = config.teacher
    if t.base_url is None or t.model is None:
        raise FedlmError("`teacher.base_url` and `teacher.model` are needed with `teacher.mode`")
    params: dict[str, Any] = {"max_tokens": t.max_tokens, "temperature": t.temperature, "seed": derive_seed(config.seed, "teacher") % 2**31}
    if t.logprobs > 0:
        params |= {"logprobs": True, "top_logprobs": t.logprobs}
    key = os.environ.get(t.api_key_env) if t.api_key_env else None
    return TeacherEndpoint(t.base_url, t.model, key, params, t.concurrency, t.retries, t.backoff_s, t.timeout_s)


@dataclass
class TeacherSource:
    """What the clients ask the teacher and what comes back, with the cache and the audit log."""

    config: ExperimentConfig
    client: TeacherClient
    cache: ResponseCache
    audit: TeacherAudit
    teaching: Teaching
    records: dict[str, ClientRecords]
    clients_dir: Path
    _generator: PromptGenerator | None = None

    def prompts(self, client: str) -> tuple[list[list[Message]], str, dict[str, float]]:
        """The prompts ``client`` sends, their source (``own``/``synthetic``) and the synthetic mode's metrics."""
        records = self.records[client]
        if self.config.teacher.mode == "label":
            return records.prompts, "own", {}
        settings = self.config.teacher.synthetic
        if settings is None:
            raise FedlmError("`teacher.mode: synthetic` needs `teacher.synthetic`")
        path = self.clients_dir / client / SYNTHETIC_FILE  # made once per client: its epsilon is spent once
        if path.is_file():
            made = SyntheticPrompts.load(path)
        else:
            if self._generator is None:
                self._generator = PromptGenerator(self.config, settings)  # loaded once per run, for the first client
            made = make_synthetic_prompts(self._generator, client, [p[-1]["content"] for p in records.prompts], records.texts, path)
        metrics = {
            "generator_epsilon": made.epsilon,
            "generator_noise_multiplier": made.noise_multiplier,
            "synthetic_generated": float(made.generated),
            "synthetic_filtered": float(made.filtered),
            "synthetic_empty": float(made.empty),
        }
        return [prompt_messages(text, self.config.data.system_prompt) for text in made.prompts], "synthetic", metrics

    def taught(self, client: str, round_num: int) -> tuple[list[TaughtExample], dict[str, float]]:
        """The client's teacher-answered examples for this round, and what it took (logged with its update)."""
        prompts, source, metrics = self.prompts(client)
        endpoint = self.client.endpoint
        keys = [request_key(endpoint.model, p, endpoint.params) for p in prompts]
        answers: dict[int, Answer | Rejected] = {}
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                answers[i] = Answer.from_json(hit)
        missing = [i for i in range(len(prompts)) if i not in answers]

        def report(j: int, status: str, detail: str) -> None:
            self.audit.record(client, round_num, prompts[missing[j]], source, status, detail)

        for j, result in enumerate(self.client.ask_all([prompts[i] for i in missing], report)):
            answers[missing[j]] = result
            if isinstance(result, Answer):
                self.cache.put(keys[missing[j]], result.to_json())
        examples = [ex for i in range(len(prompts)) if isinstance(a := answers[i], Answer) and (ex := self.teaching.example(prompts[i], a))]
        rejected = sum(1 for a in answers.values() if isinstance(a, Rejected))
        if not examples:
            raise FedlmError(
                f"client {client!r}: no usable teacher answer for its {len(prompts)} prompts ({rejected} rejected); see RUN_DIR/teacher/audit/{client}.jsonl"
            )
        metrics |= {
            "teacher_prompts": float(len(prompts)),
            "teacher_sent": float(len(missing)),
            "teacher_cache_hits": float(len(prompts) - len(missing)),
            "teacher_rejected": float(rejected),
            "teacher_examples": float(len(examples)),
            "teacher_topk_examples": float(sum(1 for ex in examples if ex.top)),
        }
        return examples, metrics


@dataclass
class PairedData(Mapping[str, Sequence[TeacherPair]]):
    """The training examples the inner runtime sees: this round's pairs of the clients being trained."""

    current: dict[str, list[TeacherPair]] = field(default_factory=dict)

    def __getitem__(self, client: str) -> Sequence[TeacherPair]:
        return self.current[client]

    def __iter__(self) -> Iterator[str]:
        return iter(self.current)

    def __len__(self) -> int:
        return len(self.current)


@dataclass
class TeacherRuntime:
    """Wraps the simulation's client runtime: teacher first, then training on (own, taught) pairs."""

    inner: Runtime
    source: TeacherSource
    view: PairedData
    own: Mapping[str, Sequence[Any]]

    def train_clients(self, tasks: Mapping[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        """Each client's update (its teacher metrics added), or a failure when its teacher could not answer."""
        done: dict[str, ClientUpdate | ClientFailure] = {}
        extra: dict[str, dict[str, float]] = {}
        ready: dict[str, ClientTask] = {}
        for client, task in tasks.items():
            try:
                taught, extra[client] = self.source.taught(client, task.plan.round)
            except FedlmError as exc:
                done[client] = ClientFailure(client, task.plan.round, f"teacher: {exc}")
                continue
            own = self.own[client]
            self.view.current[client] = [TeacherPair(ex, taught[i % len(taught)]) for i, ex in enumerate(own)]
            ready[client] = task
        try:
            results = self.inner.train_clients(ready) if ready else []
        finally:
            self.view.current.clear()
        for result in results:
            if isinstance(result, ClientUpdate):
                result = replace(result, metrics={**result.metrics, **extra[result.client_id]})
            done[result.client_id] = result
        return [done[c] for c in tasks if c in done]


def with_teacher(runtime: Runtime, session: Session, run_dir: RunDir) -> Runtime:
    """``runtime`` (the simulation's) with the configured teacher on its clients; unchanged without ``teacher.mode``."""
    config = session.config
    t = config.teacher
    if t.mode is None:
        return runtime
    if not isinstance(runtime, SimulationRuntime):
        raise FedlmError(f"`teacher.mode: {t.mode}` runs in the in-process simulation's plain trainer only")
    view = PairedData()
    trainer = replace(runtime.trainer, objective=TeacherObjective(runtime.trainer.objective, t.mix))
    cache_dir = Path(t.cache_dir) if t.cache_dir else run_dir.root / "teacher" / "cache"
    source = TeacherSource(
        config,
        TeacherClient(endpoint_of(config)),
        ResponseCache(cache_dir),
        TeacherAudit(run_dir.root / "teacher" / "audit"),
        Teaching(session.loaded.tokenizer, config.data.max_length),
        client_records(config),
        run_dir.root / "clients",
    )
    inner = SimulationRuntime(trainer, view, runtime.progress)  # type: ignore[arg-type]  # pairs: the teacher objective collates them
    return TeacherRuntime(inner, source, view, session.data.client_train)
