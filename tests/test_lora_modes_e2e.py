"""``aggregation.lora: fedex | flora | rolora`` end to end through ``fedlm run`` on the tiny model, and the config
rules that refuse the combinations these modes cannot honour."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config
from e2e_runs import run_tiny, split_records
from peft import PeftModel
from safetensors.torch import load_file

from fedlm.config.io import load_config
from fedlm.config.rules import check_config
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.experiment import build_session
from fedlm.federation.checkpoint import list_checkpoints, load_checkpoint
from fedlm.models.adapters import load_trainable_state
from fedlm.models.loading import load_base_model
from fedlm.reporting.progress import RunConsole
from fedlm.runtime.flower import messages

NEW_MODES = ["fedex", "flora", "rolora"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mode_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``mode_run(mode)``: a 2-round FedAvg run in that LoRA mode (run once, cached)."""
    cache: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in cache:
            cache[mode] = run_tiny(tmp_path_factory.mktemp(mode), aggregation={"name": "fedavg", "lora": mode})
        return cache[mode]

    return get


@pytest.mark.parametrize("mode", NEW_MODES)
def test_new_lora_mode_runs_from_the_cli(mode: str, mode_run: Callable[[str], Path]) -> None:
    run = mode_run(mode)
    assert [r["round"] for r in split_records(run, "aggregate")] == [1, 2]
    assert len(split_records(run, "train")) == 2 * 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1]).global_state
    residuals = [n for n in state if n.endswith(".lora_residual")]
    assert bool(residuals) == (mode != "rolora")  # fedex and flora keep the folded part in the global state


@pytest.mark.parametrize("mode", ["fedex", "flora"])
def test_the_residual_is_downloaded_and_counted(mode: str, mode_run: Callable[[str], Path]) -> None:
    """Round 1 starts without a residual; from round 2 every client downloads it: a dense matrix per module."""
    down = {r["round"]: r["download_bytes"] for r in split_records(mode_run(mode), "train")}
    up = {r["round"]: r["upload_bytes"] for r in split_records(mode_run(mode), "train")}
    assert down[2] > 3 * down[1]  # tiny model: d_out x d_in per module against r (d_in + d_out)
    assert up[2] == up[1]  # never uploaded


def test_fedex_logs_the_cross_term_it_keeps(mode_run: Callable[[str], Path]) -> None:
    for record in split_records(mode_run("fedex"), "aggregate"):
        share = record["aggregation"]["fedex_cross_term"]
        assert 0.0 < share < 1.0


@pytest.mark.parametrize("mode", ["fedex", "flora"])
def test_the_exported_adapter_is_the_trained_model(mode: str, mode_run: Callable[[str], Path]) -> None:
    """``adapter/`` (the residual folded in as extra LoRA rank) loaded by plain peft computes what the run's final
    global state (factors and residual) computes."""
    run = mode_run(mode)
    config = load_config(run / "config.yaml")
    session = build_session(config, RunConsole(quiet=True))
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1]).global_state
    load_trainable_state(session.model, state)
    ids = torch.arange(3, 40).reshape(1, -1)
    session.model.eval()
    with torch.no_grad():
        trained = session.model(input_ids=ids).logits
    base = load_base_model(config.model, seed=derive_seed(config.seed, "base-init") % 2**31).model  # as the run's
    reloaded = PeftModel.from_pretrained(base, str(run / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        exported = reloaded(input_ids=ids).logits
    assert torch.allclose(exported, trained, atol=1e-4), float((exported - trained).abs().max())
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(t.shape[0] > config.peft.r for n, t in saved.items() if n.endswith(".lora_A.weight"))


def test_rolora_first_round_trains_b_only_even_with_weight_decay(tmp_path: Path) -> None:
    """Round 1 freezes A: the global A after it is the seeded init bit for bit (AdamW's weight decay included)."""
    run = run_tiny(tmp_path, aggregation={"name": "fedavg", "lora": "rolora"}, federation={"rounds": 1, "weight_decay": 0.1})
    session = build_session(load_config(run / "config.yaml"), RunConsole(quiet=True))
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    a_names = [n for n in final if n.endswith(".lora_A.weight")]
    assert a_names and all(torch.equal(final[n], session.initial_state[n]) for n in a_names)
    assert any(not torch.equal(final[n], session.initial_state[n]) for n in final if n.endswith(".lora_B.weight"))


@pytest.mark.parametrize(("name", "mode"), [("fedadam", "fedex"), ("fedavg", "flora"), ("fedavgm", "rolora")])
def test_resume_is_exact(name: str, mode: str, tmp_path: Path) -> None:
    """3 rounds straight == 1 round then ``--resume`` to 3: the residual and the round parity survive a resume."""
    aggregation = {"name": name, "lora": mode}
    straight = run_tiny(tmp_path / "straight", aggregation=aggregation, federation={"rounds": 3})
    split = run_tiny(tmp_path / "split", aggregation=aggregation, federation={"rounds": 1})
    run_tiny(tmp_path / "split", aggregation=aggregation, federation={"rounds": 1}, extra_args=("--resume", "--set", "federation.rounds=3"))
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1]).global_state
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1]).global_state
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------------ config rules


def _config(**sections: Any) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"partition": {"method": "iid", "num_clients": 4, "field": None}, **sections})


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"aggregation": {"lora": "fedex"}, "privacy": {"secure_aggregation": {}}}, r"`aggregation.lora: fedex` it needs each client's own"),
        ({"aggregation": {"lora": "flora"}, "privacy": {"secure_aggregation": {}}}, r"`aggregation.lora: flora` it needs each client's own"),
        ({"aggregation": {"name": "scaffold", "lora": "flora"}}, r"`aggregation.name: scaffold` keeps per-client state"),
        ({"aggregation": {"name": "scaffold", "lora": "fedex"}}, r"`aggregation.name: scaffold` keeps per-client state"),
        ({"aggregation": {"lora": "rolora"}, "federation": {"client_processes": 2}}, r"`federation.client_processes: 2` copies only"),
        ({"aggregation": {"lora": "fedex"}, "objective": {"name": "dpo"}}, r"`objective: dpo` swaps in a reference adapter"),
        ({"aggregation": {"lora": "fedex"}, "peft": {"client_ranks": [1, 2, 4, 4]}}, r"`peft.client_ranks` with `aggregation.lora: fedex`"),
        ({"aggregation": {"lora": "rolora"}, "peft": {"client_ranks": [1, 2, 4, 4]}}, r"`peft.client_ranks` with `aggregation.lora: rolora`"),
        ({"aggregation": {"lora": "flora"}, "peft": {"method": "ia3"}}, r"`aggregation.lora: flora` needs `peft.method: lora`"),
    ],
)
def test_rules_refuse_what_the_new_modes_cannot_do(sections: dict[str, Any], match: str) -> None:
    with pytest.raises(FedlmError, match=match):
        check_config(_config(**sections))


@pytest.mark.parametrize(
    "sections",
    [
        {"aggregation": {"lora": "rolora"}, "privacy": {"secure_aggregation": {}}},
        {"aggregation": {"name": "scaffold", "lora": "rolora"}},
        {"aggregation": {"lora": "flora"}, "peft": {"client_ranks": [1, 2, 4, 4]}},
        {"aggregation": {"name": "fedadam", "lora": "fedex"}, "privacy": {"client_dp": {"noise_multiplier": 1.0}}},
    ],
)
def test_rules_accept_what_the_new_modes_can_do(sections: dict[str, Any]) -> None:
    check_config(_config(**sections))


def test_the_frozen_factor_and_the_residual_cross_the_flower_wire(tmp_path: Path) -> None:
    """A Flower train message carries the plan's frozen factor (RoLoRA) and the state's residual (FedEx-LoRA, FLoRA)."""
    config = ExperimentConfig.model_validate(tiny_config(tmp_path / "run"))
    own = {"m.lora_A.weight": torch.randn(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}  # the node's adapter: no residual
    state = {**own, "m.lora_residual": torch.randn(4, 3)}
    task = ClientTask(LocalPlan(2, [0.1], 4, 7, None, "B"), state, ClientContext("c", 2))
    _, _, back = messages.task_from_content(messages.task_content("c", task, config), {}, own)
    assert back.plan == task.plan and back.plan.frozen == "B"
    assert set(back.state) == set(state) and all(torch.equal(back.state[k], state[k]) for k in state)
