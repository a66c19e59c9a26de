"""Bad aggregation and client-rank settings fail at config load (or before training) with a message naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config, write_config
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.config import ExperimentConfig
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError

EVAL = {"every": 0, "generate": False, "max_examples": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny config (1 round, 1 local step, loss-only eval) with ``sections`` merged in."""
    federation = {"rounds": 1, "local_steps": 1, **sections.pop("federation", {})}
    return tiny_config(tmp_path / "run", eval=EVAL, federation=federation, **sections)


def _refused(tmp_path: Path, **sections: dict[str, Any]) -> str:
    """The FedlmError message ``validate_config`` gives for the tiny config with ``sections`` merged in."""
    with pytest.raises(FedlmError) as info:
        validate_config(_config(tmp_path, **sections))
    return str(info.value)


def _cli_error(tmp_path: Path, config: dict[str, Any], *args: str) -> str:
    """Run ``fedlm run`` on ``config``: exit code 2, no traceback, exactly one ``error:`` line, which is returned."""
    cfg = write_config(tmp_path / "c.yaml", config)
    result = CliRunner().invoke(app, ["run", str(cfg), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# Aggregator parameters out of their domain ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        ({"name": "fedadam", "beta1": 1.0}, "aggregation.beta1"),
        ({"name": "fedadam", "beta1": 1.5}, "aggregation.beta1"),
        ({"name": "fedyogi", "beta2": 1}, "aggregation.beta2"),
        ({"name": "fedadam", "tau": 0}, "aggregation.tau"),
        ({"name": "fedadam", "tau": -1}, "aggregation.tau"),
        ({"name": "fedadagrad", "eta": 0}, "aggregation.eta"),
        ({"name": "fedprox", "mu": -0.1}, "aggregation.mu"),
        ({"name": "fedavgm", "momentum": 1}, "aggregation.momentum"),
        ({"name": "scaffold", "option": "III"}, "aggregation.option"),
    ],
    ids=[
        "fedadam-beta1-1",
        "fedadam-beta1-1.5",
        "fedyogi-beta2-1",
        "fedadam-tau-0",
        "fedadam-tau-neg",
        "fedadagrad-eta-0",
        "fedprox-mu-neg",
        "fedavgm-momentum-1",
        "scaffold-option-III",
    ],
)
def test_aggregator_parameter_out_of_range_names_the_field(tmp_path: Path, aggregation: dict[str, Any], field: str) -> None:
    """A parameter outside its domain is refused at load, naming `aggregation.<param>` and the aggregator."""
    message = _refused(tmp_path, aggregation=aggregation)
    assert f"`{field}`" in message
    assert aggregation["name"] in message


def test_unknown_aggregator_parameter_is_refused(tmp_path: Path) -> None:
    """A key the aggregator does not have (FedAdam has no `momentum`) is refused, not silently ignored."""
    message = _refused(tmp_path, aggregation={"name": "fedadam", "momentum": 0.9})
    assert "`aggregation.momentum`" in message and "not a parameter" in message


def test_unknown_aggregator_name_lists_the_valid_ones(tmp_path: Path) -> None:
    """An unregistered `aggregation.name` is refused with the registered names."""
    message = _refused(tmp_path, aggregation={"name": "fedbogus"})
    assert "`aggregation.name`" in message and "fedbogus" in message and "fedadam" in message


def test_scaffold_option_ii_needs_sgd(tmp_path: Path) -> None:
    """SCAFFOLD option II with the default AdamW local optimizer is refused, pointing at `federation.optimizer`."""
    message = _refused(tmp_path, aggregation={"name": "scaffold", "option": "II"})
    assert "`federation.optimizer`" in message and "adamw" in message and "sgd" in message
    validate_config(_config(tmp_path, aggregation={"name": "scaffold", "option": "II"}, federation={"optimizer": "sgd"}))


def test_exact_lora_with_scaffold_explains_why(tmp_path: Path) -> None:
    """`aggregation.lora: exact` re-factorises A and B each round, so SCAFFOLD's per-client state cannot follow."""
    message = _refused(tmp_path, aggregation={"name": "scaffold", "lora": "exact"})
    assert "`aggregation.lora: exact`" in message and "scaffold" in message
    assert "SVD" in message and "state" in message  # the reason, not only the verdict
    assert "naive" in message and "ffa" in message  # and what works instead


def test_unknown_lora_mode_lists_the_choices(tmp_path: Path) -> None:
    """`aggregation.lora: bogus` is refused, naming the field and the valid modes."""
    message = _refused(tmp_path, aggregation={"lora": "bogus"})
    assert "`aggregation.lora`" in message and "bogus" in message
    assert all(mode in message for mode in ("naive", "exact", "ffa"))


def test_bad_aggregator_parameter_via_the_cli(tmp_path: Path) -> None:
    """Through ``fedlm run --set``: exit code 2 and one ``error:`` line naming the field; nothing is created."""
    line = _cli_error(tmp_path, _config(tmp_path), "--set", "aggregation.name=fedadam", "--set", "aggregation.beta1=1.5")
    assert "`aggregation.beta1`" in line
    assert not (tmp_path / "run").exists()


# peft.client_ranks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranks",
    [[1, 0, 4, 4, 4, 4, 4, 4], [1, 2, 5, 4, 4, 4, 4, 4], {"noun.animal": 0}, {"noun.animal": 9}],
    ids=["list-rank-0", "list-rank-above-r", "map-rank-0", "map-rank-above-r"],
)
def test_client_rank_outside_one_to_r_is_refused(tmp_path: Path, ranks: list[int] | dict[str, int]) -> None:
    """Every client rank must lie in 1..`peft.r`; the message names `peft.client_ranks` and r."""
    message = _refused(tmp_path, peft={"client_ranks": ranks})
    assert "`peft.client_ranks`" in message and "`peft.r` (4)" in message


def test_client_ranks_of_wrong_length_with_known_client_count(tmp_path: Path) -> None:
    """With `partition.num_clients` set (iid, 4 clients) a list of 3 ranks is refused at load, naming 3 and 4."""
    message = _refused(tmp_path, partition={"method": "iid", "num_clients": 4}, peft={"client_ranks": [1, 2, 4]})
    assert "`peft.client_ranks`" in message and "`partition.num_clients`" in message
    assert re.search(r"\b3\b", message) and re.search(r"\b4\b", message)
    validate_config(_config(tmp_path, partition={"method": "iid", "num_clients": 4}, peft={"client_ranks": [1, 2, 4, 3]}))


def test_client_ranks_of_wrong_length_for_by_field_fails_at_run(tmp_path: Path) -> None:
    """by_field learns the client count (8) from the data: 3 ranks pass load but `fedlm run` stops before training."""
    config = _config(tmp_path, peft={"client_ranks": [1, 2, 4]})
    validate_config(config)
    line = _cli_error(tmp_path, config)
    assert "`peft.client_ranks`" in line and re.search(r"\b8\b", line) and re.search(r"\b3\b", line)
    assert not (tmp_path / "run").exists()


def test_client_ranks_naming_an_unknown_client_fails_at_run(tmp_path: Path) -> None:
    """A client_ranks mapping naming a client the partition does not have stops `fedlm run`, naming it."""
    line = _cli_error(tmp_path, _config(tmp_path, peft={"client_ranks": {"noun.animal": 2, "noun.bogus": 1}}))
    assert "`peft.client_ranks`" in line and "noun.bogus" in line
    assert not (tmp_path / "run").exists()


def test_client_ranks_mapping_is_accepted_and_runs(tmp_path: Path) -> None:
    """A mapping naming some clients gives those their rank and every other client the global rank r."""
    config = _config(tmp_path, peft={"client_ranks": {"noun.animal": 2}})
    assert isinstance(validate_config(config), ExperimentConfig)
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = {r["client"]: r["rank"] for r in records if r["split"] == "train"}
    assert ranks.pop("noun.animal") == 2  # seed 0 samples noun.animal in round 1
    assert ranks and all(rank == 4 for rank in ranks.values())
