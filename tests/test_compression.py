"""Update compression (``compression.uplink``): the codecs in closed form, error feedback's bookkeeping, what is
counted, the refusals, and runs on the tiny model in the simulation and over Flower messages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from flower_grid import InMemoryGrid
from flwr.app import Context, RecordDict
from safetensors.torch import load, load_file, save

from fedlm.cli import app as cli
from fedlm.compression.codec import Codec
from fedlm.compression.downlink import advance_replica, apply_message
from fedlm.compression.feedback import compress
from fedlm.compression.quantize import levels, pack_bits, packed_length, quantize_decode, quantize_encode, unpack_bits
from fedlm.compression.topk import index_dtype, kept_count, topk_decode, topk_encode
from fedlm.compression.uplink import CompressedUplink
from fedlm.config.io import validate_config
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import torch_generator
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.core.update import ClientFailure, ClientUpdate
from fedlm.runtime.flower import client_app

# ---------------------------------------------------------------------------------------------- top-k, closed form


@pytest.mark.parametrize(("n", "ratio"), [(1000, 0.1), (1000, 0.01), (37, 0.5), (5, 0.01), (300, 1.0)])
def test_topk_keeps_exactly_ceil_ratio_n_largest_entries(n: int, ratio: float) -> None:
    x = torch.randn(n, generator=torch_generator(n))
    indices, values = topk_encode(x.reshape(-1, 1) if n % 2 else x, ratio)
    k = max(1, math.ceil(ratio * n))
    assert indices.numel() == k == kept_count(n, ratio)
    largest = set(torch.argsort(x.abs(), descending=True)[:k].tolist())
    assert set(indices.to(torch.int64).tolist()) == largest
    dense = topk_decode(indices, values, (n,))
    assert torch.equal(dense[list(largest)], x[list(largest)]) and int((dense != 0).sum()) == k


def test_topk_indices_use_the_smallest_integer_type() -> None:
    assert [index_dtype(n) for n in (256, 257, 2**15, 2**15 + 1, 2**31 + 1)] == [torch.uint8, torch.int16, torch.int16, torch.int32, torch.int64]
    indices, _ = topk_encode(torch.arange(300.0), 0.1)
    assert indices.dtype == torch.int16 and int(indices.max()) == 299


def test_error_feedback_sent_plus_residual_is_the_sum_of_the_true_updates_exactly() -> None:
    """sum_t C(Delta_t + e_t) + e_T = sum_t Delta_t (integer-valued floats: every sum is exact)."""
    codec = Codec("topk", ratio=0.1, error_feedback=True)
    gen = torch_generator(0)
    residual: dict[str, torch.Tensor] = {}
    sent_total = {"a": torch.zeros(40, 3), "b": torch.zeros(7)}
    true_total = {"a": torch.zeros(40, 3), "b": torch.zeros(7)}
    for t in range(6):
        delta = {"a": torch.randint(-50, 50, (40, 3), generator=torch_generator(t)).float(), "b": torch.randint(-9, 9, (7,)).float()}
        _, sent, residual = compress(codec, delta, residual, None, gen)
        for name in delta:
            sent_total[name] += sent[name]
            true_total[name] += delta[name]
        assert int((sent["a"] != 0).sum()) <= 12 and residual
    assert all(torch.equal(sent_total[n] + residual[n], true_total[n]) for n in true_total)
    without = Codec("topk", ratio=0.1, error_feedback=False)
    assert compress(without, {"a": torch.ones(10)}, {}, None, gen)[2] == {}


def test_compress_cuts_to_the_client_rank_and_pads_back() -> None:
    delta = {"m.lora_A.weight": torch.randn(4, 6), "m.lora_B.weight": torch.randn(5, 4)}
    delta["m.lora_A.weight"][2:] = 0
    delta["m.lora_B.weight"][:, 2:] = 0
    message, sent, residual = compress(Codec("topk", ratio=1.0, error_feedback=True), delta, {}, 2, torch_generator(0))
    assert message["m.lora_A.weight|idx"].numel() == 12 and message["m.lora_B.weight|idx"].numel() == 10  # rank 2 only
    assert all(torch.equal(sent[n], delta[n]) and not residual[n].any() for n in delta)


# ---------------------------------------------------------------------------------------------- quantize, closed form


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_round_trips_in_exactly_bits_per_code(bits: int) -> None:
    codes = torch.randint(0, 2**bits - 1, (1001,), generator=torch_generator(bits)).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_length(1001, bits) == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes.to(torch.int64))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_is_unbiased_and_on_the_grid(bits: int) -> None:
    x = torch.randn(200, generator=torch_generator(1)) * torch.linspace(0.01, 3, 200)
    block = 16
    draws = torch.stack([quantize_decode(*quantize_encode(x, bits, block, torch_generator(s)), bits, block, (200,)) for s in range(3000)])
    scales = torch.cat([x, torch.zeros(8)]).reshape(-1, block).abs().amax(dim=1).repeat_interleave(block)[:200]  # a short last block
    grid = draws / scales * levels(bits)
    assert torch.allclose(grid, grid.round(), atol=1e-4)  # every value is scale * k / s with |k| <= s
    assert float(grid.abs().max()) <= levels(bits) + 1e-4
    # the standard error of the mean of 3000 draws is at most scale / (2 s sqrt(3000)): allow 5 of them
    tolerance = 5 * scales / (2 * levels(bits) * math.sqrt(3000))
    assert bool(((draws.mean(dim=0) - x).abs() <= tolerance).all())
    biased = torch.stack([quantize_decode(*quantize_encode(x, bits, block, torch_generator(s)), bits, block, (200,)) for s in range(2)])
    assert not bool(((biased.mean(dim=0) - x).abs() <= tolerance).all())  # the check can fail: two draws are not enough


def test_quantize_message_size_is_the_packed_codes_and_one_scale_per_block() -> None:
    codec = Codec("quantize", bits=4, block_size=64)
    message = codec.encode({"w": torch.randn(100, 10)}, torch_generator(0))
    assert message["w|q"].numel() == 500 and message["w|scale"].numel() == math.ceil(1000 / 64)
    assert message["w|q"].dtype == torch.uint8 and message["w|scale"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- downlink


def test_downlink_topk_replica_reaches_a_fixed_model_after_ceil_one_over_ratio_rounds() -> None:
    """Server-side error feedback: each round sends the largest 10% of what the replica still lacks, so a fixed
    global model (distinct magnitudes) is held exactly after 10 rounds and not before."""
    w = {"a": torch.randperm(200, generator=torch_generator(3)).float().reshape(20, 10) + 1}
    replica = {"a": torch.zeros(20, 10)}
    codec = Codec("topk", ratio=0.1)
    for t in range(10):
        assert not torch.equal(replica["a"], w["a"])
        replica, _ = advance_replica(codec, w, replica, torch_generator(t))
        assert int((replica["a"] != w["a"]).sum()) == 200 - 20 * (t + 1)
    assert torch.equal(replica["a"], w["a"])


def test_a_client_replaying_the_serialised_messages_holds_the_servers_replica_bit_for_bit() -> None:
    codec = Codec("quantize", bits=3, block_size=16)
    server = {"a": torch.zeros(33, 7), "b": torch.zeros(5)}
    client = {n: t.clone() for n, t in server.items()}
    for t in range(4):
        w = {n: torch.randn(x.shape, generator=torch_generator(10 + t)) for n, x in server.items()}
        difference = {n: w[n] - server[n] for n in w}
        server_before = server
        blob = save(codec.encode(difference, torch_generator(t)))  # what travels
        server, message = advance_replica(codec, w, server, torch_generator(t))
        assert len(save(message)) == len(blob)
        decoded = codec.decode(load(blob), {n: tuple(x.shape) for n, x in client.items()})
        client = {n: client[n] + decoded[n] for n in client}
        assert all(torch.equal(client[n], x) for n, x in apply_message(codec, server_before, load(blob)).items())
    assert all(torch.equal(client[n], server[n]) for n in server)


# ---------------------------------------------------------------------------------------------- the wrapper


class _Clients:
    """A runtime whose clients send fixed deltas."""

    def __init__(self, deltas: dict[str, dict[str, torch.Tensor]]) -> None:
        self.deltas = deltas

    def train_clients(self, tasks: dict[str, ClientTask]) -> list[ClientUpdate | ClientFailure]:
        return [ClientUpdate(c, 1, 10, self.deltas[c]) for c in tasks]


def _tasks(*clients: str) -> dict[str, ClientTask]:
    state = {"w": torch.zeros(30, 20), "v": torch.zeros(9)}
    return {c: ClientTask(LocalPlan(1, [0.1], 4, 0), state, ClientContext(c, 1)) for c in clients}


def test_bytes_counted_are_the_length_of_the_encoded_message() -> None:
    deltas = {c: {"w": torch.randn(30, 20), "v": torch.randn(9)} for c in ("a", "b")}
    for codec in (Codec("topk", ratio=0.05, error_feedback=True), Codec("quantize", bits=3, block_size=32)):
        wrapper = CompressedUplink(_Clients(deltas), codec, seed=7, residuals={})
        results = wrapper.train_clients(_tasks("a", "b"))
        assert all(isinstance(r, ClientUpdate) and r.tensors["w"].shape == (30, 20) for r in results)
        for client in ("a", "b"):
            again = compress(codec, deltas[client], {}, None, torch_generator(0))[0]  # same shapes: same message length
            assert wrapper.sizes[(1, client)] == len(save(again))
            assert len(save(again)) < len(save(deltas[client])) / 2


def test_a_malformed_message_is_rejected_with_the_reason() -> None:
    codec = Codec("topk", ratio=0.1)
    good = codec.encode({"w": torch.randn(30, 20), "v": torch.randn(9)}, torch_generator(0))
    bad_index = {**good, "w|idx": good["w|idx"].clone()}
    bad_index["w|idx"][-1] = 700
    short = {**good, "v|val": good["v|val"][:0]}
    wrapper = CompressedUplink(_Clients({"a": bad_index, "b": short, "c": {"w": torch.zeros(30, 20)}}), codec, seed=0)
    results = wrapper.train_clients(_tasks("a", "b", "c"))
    assert all(isinstance(r, ClientFailure) for r in results)
    reasons = [r.reason for r in results if isinstance(r, ClientFailure)]
    assert "distinct, ascending and in [0, 600)" in reasons[0] and "values must be 1 float32" in reasons[1] and "parts differ" in reasons[2]


# ---------------------------------------------------------------------------------------------- config refusals


def _config(**sections: Any) -> dict[str, Any]:
    return tiny_config(Path("/tmp/unused"), **sections)


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        (
            {"compression": {"uplink": {"method": "topk", "ratio": 0.1}}, "privacy": {"secure_aggregation": {}}},
            "each client keeps different coordinates",
        ),
        ({"compression": {"uplink": {"method": "quantize", "bits": 4}}, "privacy": {"secure_aggregation": {}}}, "quantization_bits"),
        (
            {
                "compression": {"downlink": {"method": "quantize", "bits": 4}},
                "federation": {"runtime": "flower"},
                "peft": {"client_ranks": [2, 4, 4]},
            },
            "each node keeps the full replica",
        ),
        ({"compression": {"downlink": {"method": "topk", "ratio": 0.1, "error_feedback": False}}}, "what one round drops is sent in a later one"),
        ({"compression": {"uplink": {"method": "topk"}}}, "`ratio` is required"),
        ({"compression": {"uplink": {"method": "quantize", "bits": 9}}}, "bits"),
        ({"compression": {"uplink": {"method": "quantize", "bits": 4, "ratio": 0.1}}}, "topk setting"),
        ({"federation": {"max_mib": 0}}, "max_mib"),
    ],
)
def test_incompatible_compression_is_refused_at_load_with_the_reason(sections: dict[str, Any], needle: str) -> None:
    with pytest.raises(FedlmError, match=None) as info:
        validate_config(_config(**sections))
    assert needle in str(info.value)


def test_compression_with_dp_and_robust_aggregators_is_accepted() -> None:
    validate_config(_config(compression={"uplink": {"method": "topk", "ratio": 0.1}}, privacy={"client_dp": {"noise_multiplier": 0.5, "clip": 0.1}}))
    validate_config(_config(compression={"uplink": {"method": "quantize", "bits": 2}}, aggregation={"name": "median"}))


# ---------------------------------------------------------------------------------------------- runs on the tiny model


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _run(runner, root: Path, resume: bool = False, **sections: Any) -> Path:
    base = {"eval": {"every": 0, "generate": False, "max_examples": 8, "at_start": False}}
    cfg = write_config(root.parent / f"{root.name}.yaml", tiny_config(root, **{**base, **sections}))
    result = runner.invoke(cli, ["run", str(cfg), *(["--resume"] if resume else [])])
    assert result.exit_code == 0, result.output
    return root


def test_topk_at_ratio_one_is_the_uncompressed_run_exactly(tmp_path: Path, runner, one_torch_thread) -> None:
    plain = _run(runner, tmp_path / "plain")
    full = _run(runner, tmp_path / "topk1", compression={"uplink": {"method": "topk", "ratio": 1.0}})
    a, b = _adapter(plain), _adapter(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "uplink",
    [{"method": "topk", "ratio": 0.1}, {"method": "topk", "ratio": 0.01, "error_feedback": False}, {"method": "quantize", "bits": 4}],
)
def test_each_compressor_runs_from_the_cli_and_logs_the_encoded_size(tmp_path: Path, runner, one_torch_thread, uplink: dict[str, Any]) -> None:
    run = _run(runner, tmp_path / "run", compression={"uplink": uplink})
    rows = [r for r in _records(run) if r["split"] == "train"]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    state = load_file(str(run / "checkpoints" / "round_0002" / "global_adapter.safetensors"))
    expected = len(
        save(Codec.from_config(validate_config(_config(compression={"uplink": uplink})).compression.uplink).encode(state, torch_generator(0)))
    )
    assert all(r["upload_bytes"] == expected < r["dense_upload_bytes"] for r in rows)
    aggregate = [r for r in _records(run) if r["split"] == "aggregate"]
    assert aggregate[0]["upload_bytes"] == 3 * expected


def test_residuals_and_the_replica_survive_a_resume_and_the_run_ends_as_if_uninterrupted(tmp_path: Path, runner, one_torch_thread) -> None:
    topk = {"compression": {"uplink": {"method": "topk", "ratio": 0.05}, "downlink": {"method": "quantize", "bits": 4}}}
    straight = _run(runner, tmp_path / "straight", federation={"rounds": 3}, **topk)
    _run(runner, tmp_path / "split", federation={"rounds": 2}, **topk)
    resumed = _run(runner, tmp_path / "split", resume=True, federation={"rounds": 3}, **topk)
    a, b = _adapter(straight), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in _records(straight) if r["split"] == "train"] == [r for r in _records(resumed) if r["split"] == "train"]


def test_downlink_download_is_the_missed_messages_or_the_dense_model(tmp_path: Path, runner, one_torch_thread) -> None:
    run = _run(runner, tmp_path / "down", federation={"rounds": 3}, compression={"downlink": {"method": "topk", "ratio": 0.1}})
    rows = [r for r in _records(run) if r["split"] == "train"]
    message = rows[0]["download_bytes"]  # round 1: every client had the initial adapter, one message
    assert all(r["download_bytes"] == message for r in rows if r["round"] == 1)
    last: dict[str, int] = {}
    for r in rows:
        missed = r["round"] - last.get(r["client"], 0)
        assert r["download_bytes"] == min(missed * message, r["dense_download_bytes"])
        last[r["client"]] = r["round"]
    assert any(r["download_bytes"] == 2 * message for r in rows) and message < rows[0]["dense_download_bytes"] / 2


def test_max_mib_stops_cleanly_with_the_final_adapter_and_report(tmp_path: Path, runner, one_torch_thread) -> None:
    run = _run(runner, tmp_path / "budget", federation={"rounds": 5, "max_mib": 0.12}, compression={"uplink": {"method": "quantize", "bits": 4}})
    rows = _records(run)
    rounds = [r for r in rows if r["split"] == "aggregate"]
    per_round = rounds[0]["upload_bytes"] + rounds[0]["download_bytes"]
    assert len(rounds) == int(0.12 * 2**20 // per_round) < 5  # as many rounds as fit, not one more
    assert sum(r["upload_bytes"] + r["download_bytes"] for r in rounds) <= 0.12 * 2**20
    stop = [r for r in rows if r["split"] == "budget"]
    assert stop and stop[0]["round"] == len(rounds) and "federation.max_mib" in stop[0]["reason"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "report.md").is_file()


def test_topk_with_error_feedback_over_flower_messages_ends_with_the_simulation_adapter(tmp_path: Path, runner, one_torch_thread) -> None:
    from fedlm.runtime.flower import server_app  # noqa: PLC0415

    sections = {
        "partition": {"method": "iid", "num_clients": 3, "field": None},
        "federation": {"rounds": 3, "clients_per_round": 2},
        "compression": {"uplink": {"method": "topk", "ratio": 0.05}},
        "eval": {"every": 0, "generate": False, "max_examples": 8, "at_start": False},
    }
    sim = _run(runner, tmp_path / "sim", **sections)
    text = yaml.safe_dump(tiny_config(tmp_path / "flower", **{**sections, "federation": {**sections["federation"], "runtime": "flower"}}))
    grid = InMemoryGrid(client_app.app, {n: {"partition-id": n - 1} for n in (1, 2, 3)}, {"fedlm-config": text})
    server_app.main(grid, Context(1, 0, {}, RecordDict(), {"fedlm-config": text, "round-timeout": 5.0, "wait-for-nodes": 1.0}))
    a, b = _adapter(sim), _adapter(tmp_path / "flower")
    assert all(torch.equal(a[k], b[k]) for k in a)
    replies = [c for _, c in grid.received if "tensors" in c.array_records]
    assert len(replies) == 6
    for content in replies:  # what travelled is the encoded message, and its length is what was logged
        blob = content.array_records["tensors"]["safetensors"].numpy().tobytes()
        assert all(name.endswith(("|idx", "|val")) for name in load(blob))
    logged = [r["upload_bytes"] for r in _records(tmp_path / "flower") if r["split"] == "train"]
    blobs = [len(c.array_records["tensors"]["safetensors"].numpy().tobytes()) for c in replies]
    assert sorted(logged) == sorted(blobs)


def test_compression_composes_with_client_dp_and_robust_aggregators(tmp_path: Path, runner, one_torch_thread) -> None:
    """Client DP clips and noises the decoded update on the server: the same epsilon as without compression (the
    encoding is a function of the client's own update only); a robust aggregator measures the decoded updates."""
    dp = {"privacy": {"client_dp": {"noise_multiplier": 0.8, "clip": 0.05}}}
    plain = _run(runner, tmp_path / "dp", **dp)
    packed = _run(runner, tmp_path / "dp_topk", compression={"uplink": {"method": "topk", "ratio": 0.1}}, **dp)
    eps = [[r["aggregation"]["epsilon"] for r in _records(run) if r["split"] == "aggregate"] for run in (plain, packed)]
    assert eps[0] == eps[1] and all(e > 0 for e in eps[0])
    robust = _run(
        runner, tmp_path / "krum", aggregation={"name": "krum", "num_malicious": 0}, compression={"uplink": {"method": "quantize", "bits": 2}}
    )
    rows = [r for r in _records(robust) if r["split"] == "aggregate"]
    assert len(rows) == 2 and all(r["num_updates"] == 3 for r in rows)
