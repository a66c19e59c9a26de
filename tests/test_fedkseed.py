"""FedKSeed (``federation.algorithm: fedkseed``): the server's replay rebuilds each client's parameters bit for bit,
the upload is a few hundred bytes, and what cannot work with it is refused at load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load, load_file, save

from fedlm.cli import app as cli
from fedlm.compression.downlink import DownlinkState
from fedlm.compression.fedkseed import COEFFICIENT, GRADIENT, SEED_INDEX, candidate_seeds, perturbation, replay, seedwise_step
from fedlm.compression.seed_training import SeedReplay, SeedwiseFedAvg, ZerothOrderTrainer
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.experiment import build_session
from fedlm.models.adapters import trainable_state
from fedlm.reporting.progress import RunConsole

KS = {"algorithm": "fedkseed", "fedkseed": {"seeds": 64, "eps": 0.001}}


def _config(tmp: Path, **sections: Any) -> dict[str, Any]:
    fed = {"rounds": 2, "clients_per_round": 3, "local_steps": 6, "batch_size": 4, "lr": 0.01, **KS, **sections.pop("federation", {})}
    return tiny_config(tmp, federation=fed, eval={"every": 1, "generate": False, "max_examples": 16, "at_start": True}, **sections)


@pytest.mark.parametrize("peft", [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"method": "full"}])
def test_server_replay_equals_the_clients_own_parameters_exactly(tmp_path: Path, peft: dict[str, Any], one_torch_thread) -> None:
    config = validate_config(_config(tmp_path, peft=peft))
    session = build_session(config, RunConsole(quiet=True))
    seeds = candidate_seeds(config.seed, 64)
    trainer = ZerothOrderTrainer(
        session.model, session.loaded.tokenizer.pad_token_id, session.loaded.device, objective=session.objective, seeds=seeds, eps=1e-3
    )
    client = session.data.client_names[0]
    start = session.initial_state
    plan = LocalPlan(1, [0.01, 0.02, 0.01, 0.005], 4, 123)
    update = trainer.train(client, session.data.client_train[client], start, plan)
    own = trainable_state(session.model)  # the client's parameters after its steps
    rebuilt = replay(start, seeds, [int(i) for i in update.tensors[SEED_INDEX]], [float(g) for g in update.tensors[GRADIENT]], plan.lrs)
    assert sorted(own) == sorted(rebuilt) and all(torch.equal(own[n], rebuilt[n]) for n in own)
    assert any(not torch.equal(own[n], start[n]) for n in own)  # the steps moved something
    wrong = replay(start, seeds, [(int(i) + 1) % 64 for i in update.tensors[SEED_INDEX]], [float(g) for g in update.tensors[GRADIENT]], plan.lrs)
    assert not all(torch.equal(own[n], wrong[n]) for n in own)  # the check can fail: other seeds give other parameters
    assert len(save(update.tensors)) < 10_000


def test_the_two_point_estimate_of_a_linear_loss_is_its_directional_derivative() -> None:
    """For L(theta) = <a, theta> the estimate (L(theta + eps z) - L(theta - eps z)) / 2 eps is <a, z> exactly in
    exact arithmetic: checked in float64 on the perturbation the trainer draws."""
    like = {"w": torch.zeros(5, 3), "b": torch.zeros(4)}
    z = perturbation(7, like)
    a = {n: torch.randn(t.shape, dtype=torch.float64) for n, t in like.items()}
    loss = lambda th: sum(float((a[n] * th[n]).sum()) for n in th)  # noqa: E731
    eps = 1e-3
    plus = loss({n: eps * z[n].double() for n in z})
    minus = loss({n: -eps * z[n].double() for n in z})
    assert math.isclose((plus - minus) / (2 * eps), sum(float((a[n] * z[n].double()).sum()) for n in z), rel_tol=1e-9)
    assert torch.equal(perturbation(7, like)["w"], z["w"]) and not torch.equal(perturbation(8, like)["w"], z["w"])


def test_malformed_pairs_are_rejected_with_the_reason() -> None:
    class Clients:
        def train_clients(self, tasks: dict[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
            return [
                ClientUpdate("a", 1, 5, {SEED_INDEX: torch.tensor([0, 99], dtype=torch.int16), GRADIENT: torch.tensor([0.1, 0.2])}),
                ClientUpdate("b", 1, 5, {SEED_INDEX: torch.tensor([0, 1], dtype=torch.int16), GRADIENT: torch.tensor([0.1, float("nan")])}),
                ClientUpdate("c", 1, 5, {"w": torch.zeros(3)}),
            ]

    state = {"w": torch.zeros(3)}
    tasks = {c: ClientTask(LocalPlan(1, [0.1, 0.1], 4, 0), state, ClientContext(c, 1)) for c in "abc"}
    results = SeedReplay(Clients(), candidate_seeds(0, 64)).train_clients(tasks)
    reasons = [r.reason for r in results if isinstance(r, ClientFailure)]
    assert len(reasons) == 3 and "outside the pool of 64" in reasons[0] and "NaN" in reasons[1] and "exactly" in reasons[2]


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"privacy": {"sample_dp": {"noise_multiplier": 1.0}}}, "DP-SGD clips and noises per-example gradients"),
        ({"privacy": {"secure_aggregation": {}}}, "replay each client's own"),
        ({"aggregation": {"name": "scaffold"}}, "runs no client-side hooks"),
        ({"federation": {"runtime": "flower", "client_processes": 2}}, "runs each client on one process"),
        ({"compression": {"uplink": {"method": "topk", "ratio": 0.1}}}, "remove `compression.uplink`"),
        ({"aggregation": {"name": "fedadam"}}, "`federation.fedkseed.downlink: seeds` cannot run here"),
        ({"privacy": {"client_dp": {"noise_multiplier": 0.5, "clip": 0.1}}}, "client DP's noise"),
    ],
)
def test_what_fedkseed_cannot_run_with_is_refused_at_load(sections: dict[str, Any], needle: str) -> None:
    with pytest.raises(FedlmError) as info:
        validate_config(_config(Path("/tmp/unused"), **sections))
    assert needle in str(info.value)


def test_a_fedkseed_run_uploads_under_10_kb_and_lowers_the_test_loss(tmp_path: Path, runner, one_torch_thread) -> None:
    cfg = write_config(tmp_path / "ks.yaml", _config(tmp_path / "run"))
    result = runner.invoke(cli, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 6 and all(r["upload_bytes"] < 10_000 < r["dense_upload_bytes"] for r in train)
    message = {SEED_INDEX: torch.zeros(6, dtype=torch.int16), GRADIENT: torch.zeros(6)}
    assert all(r["upload_bytes"] == len(save(message)) for r in train)  # what is counted is the pairs' message
    test = [r["loss"] for r in rows if r["split"] == "global_test"]
    assert test[-1] < test[0]


def test_clients_rebuild_the_seedwise_fedavg_step_from_the_broadcast_list_bit_for_bit() -> None:
    seeds = candidate_seeds(0, 16)
    state = {"w": torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), "b": torch.zeros(3)}
    lrs = [0.1, 0.05, 0.1]
    pairs = {"a": ([3, 7, 3], [0.5, -1.25, 2.0]), "b": ([1, 3, 15], [-0.75, 0.25, 1.5])}
    replay_runtime = SeedReplay(None, seeds)  # type: ignore[arg-type]  # only its pairs are read
    replay_runtime.pairs = {(1, c): (i, g, lrs) for c, (i, g) in pairs.items()}
    updates = [ClientUpdate("a", 1, 30, {}), ClientUpdate("b", 1, 10, {})]
    step = SeedwiseFedAvg(replay_runtime, 1, DownlinkState({}))
    outcome = step.aggregate(state, {}, updates, 1)
    message = load(save(step.last_message))  # what travels
    assert step.downlink.message_bytes[1] == len(save(step.last_message)) and message[SEED_INDEX].tolist() == [1, 3, 7, 15]
    rebuilt = seedwise_step(state, seeds, message[SEED_INDEX].tolist(), [float(c) for c in message[COEFFICIENT]])
    assert all(torch.equal(rebuilt[n], outcome.state[n]) for n in state)
    fedavg = {
        n: state[n] + sum(p * (replay(state, seeds, i, g, lrs)[n] - state[n]) for p, (i, g) in zip((0.75, 0.25), pairs.values())) for n in state
    }
    assert all(torch.allclose(outcome.state[n], fedavg[n], atol=1e-5) for n in state)  # FedAvg of the replayed deltas


def test_a_fedkseed_run_moves_under_10_kb_per_client_per_round_and_resumes_exactly(tmp_path: Path, runner, one_torch_thread) -> None:
    straight = _cli_run(runner, tmp_path, "straight", 3)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["upload_bytes"] + r["download_bytes"] < 10_000 < r["dense_download_bytes"] for r in train)
    sizes = {r["round"]: r["aggregation"]["seed_message_bytes"] for r in rows if r["split"] == "aggregate"}
    held: dict[str, int] = {}
    for r in train:  # the lists of the rounds it missed
        assert r["download_bytes"] == sum(sizes[k] for k in range(held.get(r["client"], 0) + 1, r["round"]))
        held[r["client"]] = r["round"] - 1
    _cli_run(runner, tmp_path, "split", 2)
    resumed = _cli_run(runner, tmp_path, "split", 3, resume=True)
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli_run(runner, tmp: Path, name: str, rounds: int, resume: bool = False) -> Path:
    cfg = write_config(tmp / f"{name}.yaml", _config(tmp / name, federation={"rounds": rounds}))
    result = runner.invoke(cli, ["run", str(cfg), *(["--resume"] if resume else [])])
    assert result.exit_code == 0, result.output
    return tmp / name
