"""End to end through ``fedlm run`` on the tiny model: every aggregator, every LoRA mode, client ranks, resume.

Runs are kept to 2-3 rounds of 1 local step with a small loss-only evaluation, a second or two each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config
from e2e_runs import EVAL, final_adapter, run_tiny, split_records
from peft import get_peft_model_state_dict

from fedlm.aggregation.base import registered_aggregators
from fedlm.config.io import load_config
from fedlm.experiment import build_session
from fedlm.reporting.progress import RunConsole

# by_field on the embedded data gives these 8 clients, in this order.
CLIENTS = ["noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.person", "noun.plant", "verb.communication", "verb.motion"]
RANKS = [1, 2, 4, 3, 4, 2, 1, 4]
FULL_RANK = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_equal_adapters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[0]}"


def _seeded_adapter(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(every LoRA tensor, the trainable ones) of the adapter a fresh session of ``run``'s saved config starts from."""
    session = build_session(load_config(run / "config.yaml"), RunConsole(quiet=True))
    full = {n: t.detach().clone() for n, t in get_peft_model_state_dict(session.model).items()}
    return full, dict(session.initial_state)


# 1. Every registered aggregator runs end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def initial_adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The seeded adapter every tiny run starts from (it depends on the seed and `peft`, not on the aggregator)."""
    root = tmp_path_factory.mktemp("initial")
    cfg = write_config(root / "c.yaml", tiny_config(root / "run", eval=EVAL))
    session = build_session(load_config(cfg), RunConsole(quiet=True))
    return {n: t.detach().clone() for n, t in get_peft_model_state_dict(session.model).items()}


@pytest.mark.parametrize("name", registered_aggregators())
def test_every_aggregator_trains_the_adapter(name: str, tmp_path: Path, initial_adapter: dict[str, torch.Tensor]) -> None:
    """Two rounds with each aggregator (naive LoRA): both aggregated, bytes counted, adapter moved from its init."""
    run = run_tiny(tmp_path, aggregation={"name": name, "lora": "naive"})
    aggregates = split_records(run, "aggregate")
    assert [r["round"] for r in aggregates] == [1, 2]
    assert all(not r["skipped"] and r["num_updates"] == 3 for r in aggregates)
    assert all(r["download_bytes"] > 0 and r["upload_bytes"] > 0 for r in aggregates)
    final = final_adapter(run)
    assert set(final) == set(initial_adapter)
    assert any(not torch.equal(final[n], initial_adapter[n]) for n in final), f"{name} left the adapter unchanged"
    assert all(torch.isfinite(t).all() for t in final.values())


# 2. LoRA modes, with and without heterogeneous client ranks ------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    """``lora_run(mode, with_ranks)``: the run folder of a 2-round FedAvg run in that LoRA mode (run once, cached)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(mode: str, with_ranks: bool) -> Path:
        if (mode, with_ranks) not in cache:
            root = tmp_path_factory.mktemp(f"{mode}-{'ranks' if with_ranks else 'full'}")
            peft = {"client_ranks": RANKS} if with_ranks else {}
            cache[mode, with_ranks] = run_tiny(root, aggregation={"name": "fedavg", "lora": mode}, peft=peft)
        return cache[mode, with_ranks]

    return get


@pytest.mark.parametrize("with_ranks", [False, True], ids=["full-rank", "client-ranks"])
@pytest.mark.parametrize("mode", ["naive", "exact", "ffa"])
def test_lora_mode_runs_and_logs_each_clients_rank(mode: str, with_ranks: bool, lora_run: Callable[[str, bool], Path]) -> None:
    """Each LoRA mode completes; every train record carries its client's rank (and a truncation error in [0, 1])."""
    run = lora_run(mode, with_ranks)
    train = split_records(run, "train")
    assert len(train) == 2 * 3
    expected = dict(zip(CLIENTS, RANKS)) if with_ranks else dict.fromkeys(CLIENTS, FULL_RANK)
    assert {r["client"]: r["rank"] for r in train} == {r["client"]: expected[r["client"]] for r in train}
    for r in train:
        assert 0.0 <= r["download_truncation_error"] <= 1.0
        if r["rank"] == FULL_RANK:
            assert r["download_truncation_error"] == 0.0
    assert [r["round"] for r in split_records(run, "aggregate")] == [1, 2]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("with_ranks", [False, True], ids=["full-rank", "client-ranks"])
def test_exact_mode_logs_the_svd_error(with_ranks: bool, lora_run: Callable[[str, bool], Path]) -> None:
    """Under ``exact`` every aggregate record holds the relative error of the SVD back to rank r, in [0, 1)."""
    for record in split_records(lora_run("exact", with_ranks), "aggregate"):
        error = record["aggregation"]["svd_rel_error"]
        assert isinstance(error, float) and 0.0 <= error < 1.0


@pytest.mark.parametrize("with_ranks", [False, True], ids=["full-rank", "client-ranks"])
def test_ffa_uploads_only_b(with_ranks: bool, lora_run: Callable[[str, bool], Path]) -> None:
    """Under ``ffa`` a client uploads B only: fewer bytes than the same client in the same round under ``naive``."""
    ffa = {(r["round"], r["client"]): r["upload_bytes"] for r in split_records(lora_run("ffa", with_ranks), "train")}
    naive = {(r["round"], r["client"]): r["upload_bytes"] for r in split_records(lora_run("naive", with_ranks), "train")}
    assert set(ffa) == set(naive)  # client sampling depends on the seed and round only
    ratios = [ffa[key] / naive[key] for key in ffa]
    # A (r x d_in) and B (d_out x r) are of equal size on q/o projections; B is smaller on k/v (grouped-query
    # attention), so B alone is a bit under half of the factors, plus the safetensors header.
    assert all(0.3 < ratio < 0.5 for ratio in ratios), ratios  # seen: 0.437 at rank 4, up to 0.454 at rank 1


@pytest.mark.parametrize("with_ranks", [False, True], ids=["full-rank", "client-ranks"])
def test_ffa_keeps_lora_a_at_its_seeded_init(with_ranks: bool, lora_run: Callable[[str, bool], Path]) -> None:
    """Under ``ffa`` A is not trainable and the final adapter's A factors equal the seeded init bit for bit."""
    run = lora_run("ffa", with_ranks)
    seeded, trainable = _seeded_adapter(run)
    assert trainable and not any(".lora_A." in n for n in trainable)
    final = final_adapter(run)
    a_names = [n for n in final if ".lora_A." in n]
    assert a_names
    for name in a_names:
        assert torch.equal(final[name], seeded[name]), name
    assert any(not torch.equal(final[n], seeded[n]) for n in final if ".lora_B." in n)


def test_naive_upload_grows_with_client_rank(lora_run: Callable[[str, bool], Path]) -> None:
    """With client ranks under ``naive`` a client sends its factors cut to its rank: more rank, more bytes."""
    by_rank: dict[int, set[int]] = {}
    for r in split_records(lora_run("naive", True), "train"):
        by_rank.setdefault(r["rank"], set()).add(r["upload_bytes"])
    assert {1, FULL_RANK} <= set(by_rank), by_rank  # seed 0 samples a rank-1 and a rank-4 client
    assert all(len(sizes) == 1 for sizes in by_rank.values()), by_rank  # the size depends on the rank only
    sizes = [next(iter(by_rank[rank])) for rank in sorted(by_rank)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), by_rank
    full = {r["upload_bytes"] for r in split_records(lora_run("naive", False), "train")}
    assert full == by_rank[FULL_RANK]


# 3. Resuming a run with a stateful aggregator gives the uninterrupted run's adapter ------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [("fedadam", "naive"), ("fedavgm", "naive"), ("scaffold", "naive"), ("fedadam", "exact")],
)
def test_resume_with_server_state_is_exact(name: str, mode: str, tmp_path: Path) -> None:
    """3 rounds straight through == 1 round, then ``--resume --set federation.rounds=3`` (aggregator state restored)."""
    aggregation = {"name": name, "lora": mode}
    straight = run_tiny(tmp_path / "straight", aggregation=aggregation, federation={"rounds": 3})
    split = run_tiny(tmp_path / "split", aggregation=aggregation, federation={"rounds": 1})
    run_tiny(tmp_path / "split", aggregation=aggregation, federation={"rounds": 1}, extra_args=("--resume", "--set", "federation.rounds=3"))
    _assert_equal_adapters(final_adapter(split), final_adapter(straight))
    assert [r["round"] for r in split_records(split, "aggregate")] == [1, 2, 3]

    def untimed(records: list[dict]) -> list[dict]:  # wall times differ between runs; every other metric must not
        return [{k: v for k, v in r["aggregation"].items() if not k.endswith("_time_s")} for r in records]

    assert untimed(split_records(split, "aggregate")) == untimed(split_records(straight, "aggregate"))


# 4. SCAFFOLD option II with local SGD ----------------------------------------------------------------------------


def test_scaffold_option_ii_with_sgd_updates_the_control_variate(tmp_path: Path) -> None:
    """SCAFFOLD option II (control variate from the SGD displacement) runs and logs a nonzero server control c."""
    run = run_tiny(tmp_path, aggregation={"name": "scaffold", "option": "II"}, federation={"optimizer": "sgd", "local_steps": 2})
    aggregates = split_records(run, "aggregate")
    assert len(aggregates) == 2
    norms = [r["aggregation"]["control_variate_norm"] for r in aggregates]
    assert all(isinstance(n, float) and n > 0 for n in norms), norms
    # round 1 clients send nothing yet (c = c_i = 0), round 2 clients also download the server control c
    train = split_records(run, "train")
    first = {r["download_bytes"] for r in train if r["round"] == 1}
    second = {r["download_bytes"] for r in train if r["round"] == 2}
    assert max(first) < min(second)
