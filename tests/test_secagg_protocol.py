"""SecAgg+ itself: primitives, fixed-point encoding, the protocol's sums under dropouts, aborts and tampering."""

from __future__ import annotations

import numpy as np
import pytest

from fedlm.privacy.secagg import primitives as crypto
from fedlm.privacy.secagg import wire
from fedlm.privacy.secagg.client import SecAggClient
from fedlm.privacy.secagg.graph import neighbours
from fedlm.privacy.secagg.quantize import dequantize_sum, max_summands, quantize, sum_error_bound
from fedlm.privacy.secagg.server import SecAggAbort
from fedlm.privacy.secagg.simulate import secure_sum

LENGTH = 257


def _codes(n: int, seed: int = 0, bits: int = 20) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**bits, LENGTH, dtype=np.uint32) for u in range(1, n + 1)}


def _plain_sum(codes: dict[int, np.ndarray], who: list[int]) -> np.ndarray:
    return np.sum([codes[u].astype(np.uint64) for u in who], axis=0) % 2**32


# ----------------------------------------------------------------------------------------------- primitives


def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    secret = crypto.random_seed()
    shares = crypto.share(secret, 3, 5)
    assert [crypto.share_index(s) for s in shares] == [1, 2, 3, 4, 5]
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert crypto.reconstruct([shares[i] for i in subset]) == secret
    try:
        assert crypto.reconstruct(shares[:2]) != secret
    except ValueError:  # two shares of a degree-2 polynomial give garbage, often not even valid padding
        pass


def test_key_agreement_is_symmetric_and_labels_separate_keys() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    assert crypto.agree(a, crypto.public_bytes(b), b"x") == crypto.agree(b, crypto.public_bytes(a), b"x")
    assert crypto.agree(a, crypto.public_bytes(b), b"x") != crypto.agree(a, crypto.public_bytes(b), b"y")
    assert crypto.public_bytes(crypto.private_from_bytes(crypto.private_bytes(a))) == crypto.public_bytes(a)


def test_authenticated_encryption_detects_a_flipped_bit_and_a_wrong_context() -> None:
    key = crypto.random_seed()
    blob = crypto.encrypt(key, b"share", b"round1")
    assert crypto.decrypt(key, blob, b"round1", sender="3") == b"share"
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(crypto.TamperedShareError, match="'3'"):
        crypto.decrypt(key, flipped, b"round1", sender="3")
    with pytest.raises(crypto.TamperedShareError):
        crypto.decrypt(key, blob, b"round2", sender="3")  # replayed into another round


def test_masks_are_deterministic_per_seed_and_look_uniform() -> None:
    seed = crypto.random_seed()
    words = crypto.mask(seed, 100_000)
    assert np.array_equal(words, crypto.mask(seed, 100_000)) and words.dtype == np.uint32
    assert not np.array_equal(words, crypto.mask(crypto.random_seed(), 100_000))
    assert abs(words.mean() / 2**32 - 0.5) < 0.01  # uniform on [0, 2^32): mean 2^31, sd of the mean ~0.001


def test_harary_graph_is_k_regular_symmetric_and_seeded() -> None:
    g = neighbours(range(1, 21), 6, seed=3)
    assert all(len(v) == 6 and u not in v for u, v in g.items())
    assert all(u in g[v] for u in g for v in g[u])
    assert g == neighbours(range(1, 21), 6, seed=3) and g != neighbours(range(1, 21), 6, seed=4)
    assert neighbours([1, 2, 3], None, 0) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    with pytest.raises(ValueError, match="even"):
        neighbours(range(1, 10), 3, 0)


# ------------------------------------------------------------------------------------------------ encoding


def test_decoded_sum_is_within_the_quantisation_bound_and_unbiased() -> None:
    rng = np.random.default_rng(1)
    clip, bits, n = 0.5, 12, 7
    inputs = [rng.uniform(-clip, clip, 5000) for _ in range(n)]
    total = np.zeros(5000, dtype=np.uint32)
    for i, x in enumerate(inputs):
        codes, outside = quantize(x, clip, bits, np.random.default_rng(i))
        assert outside == 0 and codes.max() < 2**bits
        total += codes
    decoded = dequantize_sum(total, n, clip, bits)
    error = decoded - np.sum(inputs, axis=0)
    assert np.abs(error).max() <= sum_error_bound(n, clip, bits)
    assert abs(error.mean()) < 0.05 * sum_error_bound(n, clip, bits)  # stochastic rounding: no bias


def test_values_outside_the_range_are_clipped_and_counted() -> None:
    codes, outside = quantize(np.array([-3.0, 0.0, 0.2, 9.0]), 1.0, 8, np.random.default_rng(0))
    assert outside == 2 and codes[0] == 0 and codes[-1] == 255
    assert max_summands(20) == 4096


# ---------------------------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("k", [None, 4])
def test_the_unmasked_sum_equals_the_plain_sum(k: int | None) -> None:
    codes = _codes(9)
    result = secure_sum(codes, round_num=1, threshold=4, neighbours=k, graph_seed=0)
    assert result.survivors == list(range(1, 10)) and result.dropped_before_input == []
    assert np.array_equal(result.total, _plain_sum(codes, result.survivors))


def test_the_server_sees_masked_inputs_that_look_random() -> None:
    seen: dict[int, np.ndarray] = {}

    def spy(stage: str, src: int, dst: int, blob: bytes) -> bytes:
        if stage == "masked_input" and dst == 0:
            seen[src] = wire.vector(wire.from_bytes(blob))
        return blob

    codes = _codes(5, bits=8)  # codes < 256
    secure_sum(codes, round_num=1, threshold=3, neighbours=None, graph_seed=0, tamper=spy)
    assert set(seen) == set(codes)
    for u, y in seen.items():
        assert not np.array_equal(y, codes[u]) and y.max() > 2**24  # the self-mask spreads it over [0, 2^32)


def test_dropouts_before_and_after_the_masked_input_up_to_the_threshold_give_the_survivors_sum() -> None:
    codes = _codes(8)
    drop = {"share_keys": {2}, "masked_input": {5}, "unmask": {7}}  # full graph: 8 - 3 = 5 responders >= t = 5
    result = secure_sum(codes, round_num=3, threshold=5, neighbours=None, graph_seed=1, drop=drop)
    assert result.survivors == [1, 3, 4, 6, 7, 8]  # 7 sent its masked input, then dropped: still summed
    assert result.dropped_before_input == [5]  # shared keys, no input: its pair masks are removed
    assert np.array_equal(result.total, _plain_sum(codes, result.survivors))


def test_secagg_plus_survives_dropouts_its_graph_allows() -> None:
    codes = _codes(12, seed=2)
    g = neighbours(range(1, 13), 4, seed=5)
    dropped = 1  # one dropout leaves every client >= 4 of its 5 holders: t = 3 is safe
    result = secure_sum(codes, round_num=1, threshold=3, neighbours=4, graph_seed=5, drop={"masked_input": {dropped}})
    assert dropped not in result.survivors and result.dropped_before_input == [dropped]
    assert np.array_equal(result.total, _plain_sum(codes, result.survivors))
    assert all(len(g[u]) == 4 for u in g)


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input", "unmask"])
def test_more_dropouts_than_the_threshold_allows_abort_cleanly(stage: str) -> None:
    with pytest.raises(SecAggAbort, match="threshold 5"):
        secure_sum(_codes(6), round_num=1, threshold=5, neighbours=None, graph_seed=0, drop={stage: {1, 2}})


def test_a_share_altered_in_transit_is_detected_by_its_receiver() -> None:
    def flip(stage: str, src: int, dst: int, blob: bytes) -> bytes:
        if stage == "masked_input" and src == 0 and dst == 4:  # the server relays 4's inbox with one bit flipped
            msg = wire.from_bytes(blob)
            f = wire.fields(msg)
            ct = list(f["ciphertexts"])
            ct[0] = ct[0][:-1] + bytes([ct[0][-1] ^ 1])
            return wire.to_bytes(wire.message({"src": list(f["src"]), "ciphertexts": ct}))
        return blob

    with pytest.raises(crypto.TamperedShareError, match="failed authentication"):
        secure_sum(_codes(5), round_num=1, threshold=3, neighbours=None, graph_seed=0, tamper=flip)


def test_a_wrong_share_revealed_for_unmasking_is_detected_by_the_server() -> None:
    def corrupt(stage: str, src: int, dst: int, blob: bytes) -> bytes:
        if stage == "unmask" and src == 2 and dst == 0:  # client 2 lies about one share it reveals
            f = wire.fields(wire.from_bytes(blob))
            shares = list(f["shares"])
            shares[0] = shares[0][:4] + bytes(b ^ 0x5A for b in shares[0][4:])
            return wire.to_bytes(wire.message({"ids": list(f["ids"]), "kinds": list(f["kinds"]), "shares": shares}))
        return blob

    with pytest.raises(crypto.TamperedShareError, match="tampered share"):
        secure_sum(_codes(4), round_num=1, threshold=4, neighbours=None, graph_seed=0, tamper=corrupt)


def test_a_client_refuses_to_reveal_both_shares_of_one_client_or_too_few_survivors() -> None:
    client = SecAggClient(1)
    client.advertise_keys(wire.message({"round": 1, "threshold": 3, "length": 4, "neighbours": [2, 3, 4]}))
    with pytest.raises(Exception, match="both shares"):
        client.unmask(wire.message({"survivors": [1, 2, 3], "dropped": [3]}))
    with pytest.raises(Exception, match="below the threshold"):
        client.unmask(wire.message({"survivors": [1, 2], "dropped": [3]}))


def test_bytes_are_counted_per_client_and_upload_is_about_the_vector() -> None:
    result = secure_sum(_codes(6), round_num=1, threshold=4, neighbours=None, graph_seed=0)
    assert set(result.upload_bytes) == set(range(1, 7))
    for u, up in result.upload_bytes.items():
        assert 4 * LENGTH < up < 4 * LENGTH + 3000  # the masked vector, keys and 5 encrypted shares
        assert result.download_bytes[u] > 0


# --------------------------------------------------------------------------------- the round's aggregation


def _space_and_updates(n: int = 5, scale: float = 0.01):
    import torch

    from fedlm.core.update import ClientUpdate

    g = torch.Generator().manual_seed(0)
    space = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    updates = [
        ClientUpdate(f"c{i}", 1, 20 + 7 * i, {k: scale * (i + 1) * torch.randn(v.shape, generator=g) for k, v in space.items()}) for i in range(n)
    ]
    return space, updates


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_secure_dp_equals_plain_dp_without_noise_within_the_quantisation_bound(mode: str) -> None:
    from fedlm.aggregation.base import build_aggregator
    from fedlm.config import SecureAggregationConfig
    from fedlm.privacy.client_dp import DifferentiallyPrivate
    from fedlm.privacy.secagg.round import SecureAggregation

    space, updates = _space_and_updates()
    params = {"noise_multiplier": 0.0, "clip": 0.05, "expected_clients": 5, "mode": mode}
    plain = DifferentiallyPrivate.from_config(build_aggregator("fedavg", {}), {**params, "mode": "central"})
    secure_dp = DifferentiallyPrivate.from_config(build_aggregator("fedavg", {}), params)
    expected = plain.aggregate(space, updates).params
    secure = SecureAggregation(SecureAggregationConfig(clip_range=0.1), threshold=3, seed=0)
    out = secure.aggregate(secure_dp, space, updates, [u.client_id for u in updates], 1)
    bound = out.metrics["secagg_sum_error_bound"] / 5
    assert out.result is not None and out.metrics["secagg_clipped_coordinates"] == 0
    for k in expected:
        assert float((out.result.params[k] - expected[k]).abs().max()) <= bound
    assert plain.aggregate(space, updates).metrics["dp_fraction_clipped"] > 0.5  # clipping did matter


def test_fedavg_weights_travel_in_the_sum() -> None:
    from fedlm.aggregation.base import build_aggregator
    from fedlm.config import SecureAggregationConfig
    from fedlm.privacy.secagg.round import SecureAggregation

    space, updates = _space_and_updates()
    expected = build_aggregator("fedavg", {}).aggregate(space, updates).params
    secure = SecureAggregation(SecureAggregationConfig(max_weight=64), threshold=3, seed=0)
    out = secure.aggregate(build_aggregator("fedavg", {}), space, updates, [u.client_id for u in updates], 1)
    weight = sum(u.num_examples for u in updates) / 64
    for k in expected:
        assert float((out.result.params[k] - expected[k]).abs().max()) <= out.metrics["secagg_sum_error_bound"] / weight * 1.01
