"""One client on two processes (``federation.client_processes: 2``, gloo on CPU): the update equals the
single-process update of the same global batch, hooks see the same values, a dead worker fails the client, a run
completes, and the config refuses what cannot work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from fedlm.aggregation.fedprox import ProximalHook
from fedlm.aggregation.scaffold import CLIENT_C, SERVER_C, ScaffoldHook
from fedlm.cli import app
from fedlm.config import DataConfig, PeftConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.sampling import batch_indices
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.data.readers import read_records
from fedlm.experiment import Session, build_session, client_process_model
from fedlm.federation.data_parallel import ClientProcesses
from fedlm.models.adapters import attach_adapter, load_trainable_state, named_trainable_parameters
from fedlm.models.tiny import build_byte_tokenizer, build_tiny_llama
from fedlm.objectives import build_objective
from fedlm.reporting.progress import RunConsole
from fedlm.runtime.simulation import SimulationRuntime
from tests.conftest import tiny_config, write_config

PLAN = LocalPlan(round=1, lrs=[0.01, 0.005], batch_size=5, seed=123)  # 5 examples: shards of 3 and 2


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Session:
    raw = tiny_config(
        tmp_path_factory.mktemp("dp"), peft={"r": 4, "alpha": 8, "dropout": 0.0}, model={"name": "tiny-random-llama", "dtype": "float32"}
    )
    return build_session(validate_config(raw), RunConsole(quiet=True))


@pytest.fixture(scope="class")
def processes(session: Session) -> Iterator[ClientProcesses]:
    """Two processes for the tests of one class (one process group per process at a time: closed after it)."""
    with ClientProcesses(2, partial(client_process_model, session.config), session.loaded.device, timeout_s=60.0) as group:
        yield group


def _client(session: Session) -> str:
    return session.data.client_names[0]


def _assert_same_update(one: ClientUpdate, two: ClientUpdate) -> None:
    assert set(one.tensors) == set(two.tensors)
    for name in one.tensors:
        torch.testing.assert_close(two.tensors[name], one.tensors[name], rtol=0, atol=1e-5)
    assert max(float(t.abs().max()) for t in one.tensors.values()) > 1e-3  # the steps moved the adapter
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], abs=1e-5)
    assert two.metrics["tokens"] == one.metrics["tokens"]


class TestSameUpdateAsOneProcess:
    """The same global batch and seed on one and on two processes."""

    @pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
    def test_two_processes_give_the_single_process_update(self, session: Session, processes: ClientProcesses, optimizer: str) -> None:
        client = _client(session)
        examples, state = session.data.client_train[client], session.initial_state
        trainer = processes.trainer(session.trainer())
        trainer.optimizer = optimizer
        base = session.trainer()
        base.optimizer = optimizer
        _assert_same_update(base.train(client, examples, state, PLAN), trainer.train(client, examples, state, PLAN))
        # the shards differ in size, so a plain average of the two ranks' token-means would give another gradient
        batch = session.objective.collate(examples[:5], session.loaded.tokenizer.pad_token_id)
        first, second = session.objective.split_batch(batch, 2)
        assert session.objective.loss_items(first) != session.objective.loss_items(second)

    def test_one_sgd_step_equals_a_plain_pytorch_gradient(self, session: Session, processes: ClientProcesses) -> None:
        """Reference: the clipped mean-token gradient of the whole batch, by hand, and one SGD step."""
        client = _client(session)
        examples, state = session.data.client_train[client], session.initial_state
        plan = LocalPlan(round=1, lrs=[0.5], batch_size=5, seed=7)
        trainer = processes.trainer(session.trainer())
        trainer.optimizer = "sgd"
        update = trainer.train(client, examples, state, plan)
        model = session.model
        load_trainable_state(model, state)
        named = named_trainable_parameters(model)
        batch = session.objective.collate([examples[i] for i in batch_indices(len(examples), 1, 5, 7)[0]], session.loaded.tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        grads = torch.autograd.grad(loss, list(named.values()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        scale = min(1.0, 1.0 / (float(norm) + 1e-6))  # max_grad_norm 1.0, as clip_grad_norm_
        for (name, _), grad in zip(named.items(), grads):
            torch.testing.assert_close(update.tensors[name], -0.5 * scale * grad, rtol=0, atol=1e-6)

    def test_fedprox_and_scaffold_hooks_see_the_single_process_values(self, session: Session, processes: ClientProcesses) -> None:
        client = _client(session)
        examples, state = session.data.client_train[client], session.initial_state
        c = {SERVER_C + n: torch.full_like(t, 0.01) for n, t in state.items()}
        c_i = {CLIENT_C + n: torch.full_like(t, -0.02) for n, t in state.items()}
        context = ClientContext(client, 1, c, c_i)

        def hooks() -> list:
            return [ProximalHook(0.5), ScaffoldHook("I")]  # the proximal loss once, the start gradient data-parallel

        one = session.trainer(hooks()).train(client, examples, state, PLAN, context=context)
        two = processes.trainer(session.trainer(hooks())).train(client, examples, state, PLAN, context=context)
        _assert_same_update(one, two)
        for name in one.extras:
            torch.testing.assert_close(two.extras[name], one.extras[name], rtol=0, atol=1e-4)

    def test_a_dead_worker_fails_the_client_with_its_reason(self, session: Session, processes: ClientProcesses) -> None:
        """Last in the class: it kills the class's worker."""
        processes._procs[0].kill()
        processes._procs[0].join()
        runtime = SimulationRuntime(processes.trainer(session.trainer()), session.data.client_train)
        client = _client(session)
        task = ClientTask(PLAN, session.initial_state, ClientContext(client, 1))
        started = time.perf_counter()
        [result] = runtime.train_clients({client: task})
        assert time.perf_counter() - started < 30.0  # a failure, not a hang
        assert isinstance(result, ClientFailure)
        assert "worker rank 1 exited with code" in result.reason
        assert isinstance(runtime.train_clients({client: task})[0], ClientFailure)  # and so stays, quickly


@pytest.mark.parametrize(("name", "data"), [("sft", "embedded:wordnet_defs"), ("dpo", "embedded:wordnet_prefs")])
def test_weighted_shard_losses_add_up_to_the_batch_loss_and_gradient(name: str, data: str) -> None:
    """The rule every rank follows, in one process: sum over shards of loss(shard) * items(shard) / items(batch)
    is the batch's loss, and its gradient the batch's gradient (sft: tokens; dpo: whole pairs, chosen then rejected)."""
    tokenizer = build_byte_tokenizer()
    objective = build_objective(name)
    examples = objective.train_examples(read_records(data)[:5], tokenizer, DataConfig(max_length=96), "c", ["x"] * 5)
    model = attach_adapter(build_tiny_llama(len(tokenizer), seed=1), PeftConfig(r=4, alpha=8, dropout=0.0), seed=5)
    params = list(named_trainable_parameters(model).values())
    batch = objective.collate(examples, tokenizer.pad_token_id)
    loss = objective.loss(model, batch)[0]
    whole = torch.autograd.grad(loss, params)
    parts = objective.split_batch(batch, 2)
    assert sum(objective.loss_items(p) for p in parts) == objective.loss_items(batch)
    sharded = sum(objective.loss(model, p)[0] * objective.loss_items(p) / objective.loss_items(batch) for p in parts)
    torch.testing.assert_close(sharded, loss, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(sharded, params), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_run_with_two_processes_per_client_completes(tmp_path: Path, runner, one_torch_thread: None) -> None:
    out = tmp_path / "run"
    raw = tiny_config(out, federation={"rounds": 1, "clients_per_round": 2, "local_steps": 2, "batch_size": 4, "lr": 0.003, "client_processes": 2})
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "c.yaml", raw))])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [aggregate] = [r for r in rounds if r["round"] == 1 and r["split"] == "aggregate"]
    assert aggregate["num_updates"] == 2 and aggregate["rejected"] == []  # both clients trained on two processes
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("federation", "privacy", "needle"),
    [
        ({"client_processes": 0}, {}, "client_processes"),
        ({"client_processes": 2}, {"sample_dp": {"noise_multiplier": 1.0}}, "privacy.sample_dp"),
        ({"client_processes": 5, "batch_size": 4}, {}, "must be <= `federation.batch_size` (4)"),
    ],
)
def test_config_refuses_what_cannot_run_data_parallel(tmp_path: Path, federation: dict, privacy: dict, needle: str) -> None:
    raw = tiny_config(tmp_path, federation=federation, **({"privacy": privacy} if privacy else {}))
    with pytest.raises((FedlmError, ValueError), match=None) as info:
        validate_config(raw)
    assert needle in str(info.value)


@pytest.mark.slow
def test_a_supernode_trains_its_client_on_two_processes_as_the_simulation_does(tmp_path: Path, runner, one_torch_thread: None) -> None:
    """Over Flower (the node's ClientApp called with real Flower messages, in this process) a data-parallel client's
    rank 0 trains with its worker, started once and kept between the messages; the run ends with the simulation's
    adapter bit for bit (same code path: the single-process equality is tested above)."""
    import yaml
    from flower_grid import InMemoryGrid
    from flwr.app import Context, RecordDict
    from safetensors.torch import load_file

    from fedlm.runtime.flower import client_app, node_cache, server_app

    def config(out: Path, runtime: str) -> dict:
        return tiny_config(
            out,
            partition={"method": "iid", "num_clients": 1, "field": None},
            federation={"runtime": runtime, "client_processes": 2, "rounds": 2, "clients_per_round": 1, "local_steps": 2, "batch_size": 4},
            eval={"every": 0, "at_start": False, "generate": False, "max_examples": 4},
        )

    sim = tmp_path / "sim"
    result = runner.invoke(app, ["run", str(write_config(tmp_path / "sim.yaml", config(sim, "simulation")))])
    assert result.exit_code == 0, result.output
    text = yaml.safe_dump(config(tmp_path / "flower", "flower"))
    grid = InMemoryGrid(client_app.app, {1: {"partition-id": 0}}, {"fedlm-config": text})
    try:
        server_app.main(grid, Context(1, 0, {}, RecordDict(), {"fedlm-config": text, "round-timeout": 120.0, "wait-for-nodes": 1.0}))
        kept = list(node_cache._processes.values())
        assert len(kept) == 1 and kept[0].broken is None  # one worker group for both rounds' messages
    finally:
        node_cache.clear()
    a = load_file(str(sim / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
