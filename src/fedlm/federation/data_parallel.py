"""One client on several processes: data-parallel local training (``federation.client_processes``).

Rank 0 is the client's own :class:`~fedlm.federation.trainer.ClientTrainer`, where the client already lives (the
simulation process); ranks 1..N-1 are worker processes started here (``torch.multiprocessing`` spawn, one
``torch.distributed`` group over a TCP store on loopback; backend gloo on CPU, nccl on CUDA with one GPU per rank).
Each worker loads the same frozen base model and adapter once and serves every client of the run; only rank 0 talks
to the server, runs the algorithm's hooks and steps the optimizer. One local step of a global batch of B examples:

1. rank 0 draws the batch as the single-process trainer does (the same ``batch_indices``), collates it and cuts it
   into N shards of whole examples (:meth:`Objective.split_batch`); it sends shards 1..N-1 and its current
   trainable tensors to the workers (one broadcast);
2. every rank computes its shard's loss as a *sum over the shard's items / the global count* (tokens for sft and
   clm, pairs for dpo: :meth:`Objective.loss_items`), so the ranks' losses add up to the single-process mean,
   and backpropagates it;
3. the ranks' gradients are **summed** into rank 0 (one ``reduce``), which gives the gradient of the global batch;
   hooks' data-independent terms (FedProx's proximal loss) are added on rank 0 only, so they count once;
4. rank 0 clips (``max_grad_norm``) the summed gradient, applies the hooks' corrections (SCAFFOLD) and steps,
   exactly as with one process. SCAFFOLD's start gradient (option I) is computed data-parallel in the same way.

So the update equals the single-process update of the same global batch up to float summation order (the test
holds them within 1e-5 in float32). Dropout draws differ (each rank seeds its own from rank 0's seeded RNG), so with
dropout the update is an equally valid but different draw. A worker that dies or hangs fails the client's training
with :class:`WorkerLost` (a collective times out after ``timeout_s``) instead of hanging the run.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import named_trainable_parameters
from fedlm.objectives.base import Batch, Objective

#: rank -> (the model with its adapter, the objective, the device), called in each worker process; must pickle
ModelFactory = Callable[[int], tuple[torch.nn.Module, Objective, torch.device]]
TIMEOUT_S = 600.0  # a collective (or a worker's start) waiting longer than this fails the client
_STOP = "stop"


def _ready(rank: int) -> str:
    """The store key a worker sets once its model is loaded."""
    return f"fedlm-worker-{rank}-loaded"


class WorkerLost(RuntimeError):
    """A data-parallel worker of the client died, failed or timed out; the client sends no update."""


def backend_for(device: torch.device) -> str:
    """nccl on CUDA (one GPU per rank), gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


class ClientProcesses:
    """Rank 0's handle on the worker processes of a data-parallel client: start, step, close."""

    def __init__(self, world: int, factory: ModelFactory, device: torch.device, timeout_s: float = TIMEOUT_S) -> None:
        if world < 2:
            raise ValueError("a data-parallel client needs at least 2 processes")
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise FedlmError(
                f"`federation.client_processes: {world}` needs one GPU per process, but this machine has "
                f"{torch.cuda.device_count()}; lower `federation.client_processes`"
            )
        if dist.is_available() and dist.is_initialized():
            raise FedlmError(
                "`federation.client_processes` > 1 starts its own process group, but torch.distributed is "
                "already initialised in this process (e.g. under torchrun); launch fedlm without it"
            )
        self.world, self.device, self.timeout_s = world, device, timeout_s
        self.broken: str | None = None
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        backend = backend_for(device)
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world, store.port, factory, backend, timeout_s, self._errors),
                daemon=True,
                name=f"fedlm-client-rank{rank}",
            )
            for rank in range(1, world)
        ]
        for proc in self._procs:
            proc.start()
        try:
            self._wait_until_loaded(store)
            dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout)
        except Exception as exc:
            self._kill()
            raise FedlmError(f"`federation.client_processes: {world}`: the worker processes did not start: {self._reason(exc)}") from exc
        self._store = store  # kept alive for the group's lifetime

    def _wait_until_loaded(self, store: dist.TCPStore) -> None:
        """Wait for every worker to load its model (a key in the store), failing at once when one dies."""
        keys, deadline = [_ready(rank) for rank in range(1, self.world)], time.monotonic() + self.timeout_s
        while not store.check(keys):
            if any(not proc.is_alive() for proc in self._procs):
                raise RuntimeError("a worker exited while loading the model")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not load the model within {self.timeout_s:.0f} s")
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------------- rank 0's side

    def trainer(self, trainer: ClientTrainer) -> ClientTrainer:
        """``trainer`` with its objective sharded over the processes and their gradients summed after backward."""
        return dataclasses.replace(trainer, objective=ShardedObjective(trainer.objective, self), gradient_sum=self.sum_gradients)

    def shard_loss(self, model: torch.nn.Module, objective: Objective, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Rank 0's part of one step: send the other shards and the trainable tensors, compute shard 0's weighted
        loss (to backpropagate) and return it plus the other ranks' loss values, i.e. the global batch's loss."""
        parts = objective.split_batch(batch, self.world)
        total = objective.loss_items(batch)
        named = named_trainable_parameters(model)
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in named.values()])
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the workers' dropout, from rank 0's seeded RNG
        shards = [{k: v.cpu() for k, v in part.items()} for part in parts[1:]]
        self._collective(lambda: dist.broadcast_object_list([(shards, total, flat.numel(), seed)], src=0))
        self._collective(lambda: dist.broadcast(flat, src=0))
        loss, metrics = objective.loss(model, parts[0])
        weight = objective.loss_items(parts[0]) / total
        gathered: list[Any] = [None] * self.world
        self._collective(lambda: dist.gather_object((float(loss.detach()) * weight, metrics, weight), gathered, dst=0))
        others = sum(value for value, _, _ in gathered[1:])
        merged = {key: sum(w * m.get(key, 0.0) for _, m, w in gathered) for key in metrics}  # item-weighted means
        return loss * weight + others, merged

    def sum_gradients(self, named: Mapping[str, torch.nn.Parameter]) -> None:
        """Replace rank 0's ``param.grad`` by the sum over ranks (its shard's and every worker's)."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in named.values()])
        self._collective(lambda: dist.reduce(flat, dst=0))
        offset = 0
        for p in named.values():
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def _collective(self, call: Callable[[], object]) -> None:
        """Run a collective; a dead, failed or silent worker becomes :class:`WorkerLost` with its reason."""
        if self.broken is not None:
            raise WorkerLost(self.broken)
        try:
            call()
        except Exception as exc:
            self.broken = self._reason(exc)
            raise WorkerLost(self.broken) from exc

    def _reason(self, exc: BaseException) -> str:
        """Why the group failed: each worker's exit code and error, then the collective's own message."""
        lines = []
        for rank, proc in enumerate(self._procs, start=1):
            proc.join(timeout=1.0)
            if proc.exitcode is not None:
                lines.append(f"worker rank {rank} exited with code {proc.exitcode}")
        while True:
            try:
                rank, error = self._errors.get(timeout=0.5)
            except (queue.Empty, OSError, ValueError):
                break
            lines.append(f"worker rank {rank} failed: {error.strip().splitlines()[-1]}")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        who = "; ".join(lines) or f"a worker did not answer within {self.timeout_s:.0f} s"
        return f"data-parallel client lost a process ({who}): {first[:300]}"

    # ------------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the workers (a stop message, then terminate what is left) and leave the process group."""
        if self.broken is None:
            try:
                dist.broadcast_object_list([_STOP], src=0)
            except Exception:  # noqa: BLE001 - closing anyway: the workers are terminated below
                self.broken = "closed"
        for proc in self._procs:
            proc.join(timeout=10.0)
        self._kill()
        self._errors.close()
        self._errors.join_thread()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5.0)

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ShardedObjective(Objective):
    """The client's objective, its loss computed over the data-parallel processes (data methods pass through)."""

    name = "data_parallel"

    def __init__(self, inner: Objective, processes: ClientProcesses) -> None:
        super().__init__(inner.params)
        self.inner, self.processes = inner, processes

    def check_records(self, records: Sequence[Any], field_name: str, data: Any) -> None:
        self.inner.check_records(records, field_name, data)

    def train_examples(self, records: Sequence[Any], tokenizer: Any, data: Any, who: str, where: Sequence[str]) -> list[Any]:
        return self.inner.train_examples(records, tokenizer, data, who, where)

    def test_examples(self, records: Sequence[Any], tokenizer: Any, data: Any, owners: Sequence[str | None], where: str) -> list[Any]:
        return self.inner.test_examples(records, tokenizer, data, owners, where)

    def collate(self, examples: Sequence[Any], pad_id: int) -> Batch:
        return self.inner.collate(examples, pad_id)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.processes.shard_loss(model, self.inner, batch)

    def loss_items(self, batch: Batch) -> int:
        return self.inner.loss_items(batch)


# ----------------------------------------------------------------------------------------------- the workers


def _worker_main(rank: int, world: int, port: int, factory: ModelFactory, backend: str, timeout_s: float, errors: Any) -> None:
    """A worker rank: load the model once, join the group, then compute shard gradients until told to stop."""
    try:
        model, objective, device = factory(rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        store.set(_ready(rank), "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        named = named_trainable_parameters(model)
        model.train()
        while _serve_step(rank, model, objective, named, device):
            pass
    except BaseException:
        errors.put((rank, traceback.format_exc(limit=4)))
        raise
    os._exit(0)  # told to stop: nothing to flush, and the interpreter's teardown of torch takes seconds


def _serve_step(rank: int, model: torch.nn.Module, objective: Objective, named: dict[str, torch.nn.Parameter], device: torch.device) -> bool:
    """One step on this rank's shard (False: stop): rank 0's tensors in, the weighted loss out, gradients summed."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] == _STOP:
        return False
    shards, total, numel, seed = box[0]
    flat = torch.empty(numel, dtype=torch.float32, device=device)
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in named.values():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    shard = {k: v.to(device) for k, v in shards[rank - 1].items()}
    weight = objective.loss_items(shard) / total
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "rank", rank) % 2**63)
        loss, metrics = objective.loss(model, shard)
    dist.gather_object((float(loss.detach()) * weight, metrics, weight), None, dst=0)
    (loss * weight).backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in named.values()])
    dist.reduce(grads, dst=0)
    return True
