"""The serving engine: model ids -> mixes, and one generation worker thread fed by a queue.

Requests for any client share the one base model: the worker takes the oldest waiting request, batches with it every
waiting request (after a short wait, ``batch_wait_s``, when it arrives at an idle worker) that can share its forward passes (:meth:`fedlm.inference.mix.MixedModel.batch_key`: on a LoRA run
every client and mix but ``logits`` in one batch, each row's adapters scaled to it; otherwise the same model id), up
to ``max_batch``, left-padded; generates, and moves on. Adapters are switched or stacked, never copied. Callbacks run
on the worker thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedlm.config.schema.inference import InferenceConfig
from fedlm.core.errors import FedlmError
from fedlm.inference.generate import Completion, SamplingParams, generate
from fedlm.inference.mix import MixedModel, MixSpec
from fedlm.inference.run import GLOBAL, InferenceRun

CLIENT_PREFIX = "client/"


class UnknownModel(FedlmError):
    """A model id that this server does not serve (HTTP 404)."""


@dataclass
class Job:
    """One request waiting for the worker."""

    spec: MixSpec
    prompt: list[int]
    params: SamplingParams
    on_text: Callable[[str], None]
    on_done: Callable[[Completion], None]
    on_error: Callable[[BaseException], None]


class Engine:
    """Model ids, validation and the worker thread over one :class:`MixedModel`."""

    def __init__(self, run: InferenceRun, settings: InferenceConfig, max_batch: int = 8, batch_wait_s: float = 0.02) -> None:
        self.run = run
        self.mixed = MixedModel(run)
        self.settings = settings
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s  # after an idle spell, how long the first request waits for others to join it
        self.batches: list[int] = []  # the size of every batch run (for tests and the benchmark)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fedlm-generate", daemon=True)
        self._thread.start()

    # -- model ids -------------------------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """``global``; per client ``client/<name>`` (its personal model) and ``client/<name>+<mix>`` for each mix."""
        ids = [GLOBAL]
        for name, client in sorted(self.run.clients.items()):
            mixes = ["adapter", "logits"] if self.run.is_lora and client.combine != "prompt" else ["logits"]
            ids += [f"{CLIENT_PREFIX}{name}"] + [f"{CLIENT_PREFIX}{name}+{mix}" for mix in mixes]
        return ids

    def resolve(self, model_id: str) -> MixSpec:
        """The mix behind a model id (weight and combine from the ``inference`` settings); refused when not served."""
        if model_id == GLOBAL:
            return MixSpec(mix="global")
        client, _, mix = model_id.removeprefix(CLIENT_PREFIX).partition("+")
        if not model_id.startswith(CLIENT_PREFIX) or model_id not in self.model_ids():
            raise UnknownModel(f"model {model_id!r} does not exist; served models: {', '.join(self.model_ids())}")
        spec = MixSpec.from_config(self.settings, client, mix=mix or "local")
        self.mixed.check(spec)
        return spec

    # -- the worker ------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; its callbacks will be called from the worker thread."""
        self._queue.put(job)

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        pending: list[Job] = []
        while True:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
                time.sleep(self.batch_wait_s)  # a burst of concurrent requests starts as one batch
            while True:  # everything that arrived meanwhile
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                pending.append(more)
            key = self.mixed.batch_key(pending[0].spec)
            batch = [job for job in pending if self.mixed.batch_key(job.spec) == key][: self.max_batch]
            pending = [job for job in pending if job not in batch]
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        self.batches.append(len(batch))

        def on_text(row: int, text: str) -> None:
            batch[row].on_text(text)

        try:
            results = generate(self.mixed, [j.spec for j in batch], [j.prompt for j in batch], [j.params for j in batch], on_text)
        except Exception as exc:  # one failed batch answers its requests with the error; the server keeps serving
            for job in batch:
                job.on_error(exc)
            return
        for job, result in zip(batch, results):
            job.on_done(result)
