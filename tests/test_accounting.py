"""The DP accountant against published epsilons, its inverse, the ledger, and ``fedlm privacy plan``.

Goldens are copied from the test files named next to each one (read from the files, not from memory):

- Opacus ``opacus/tests/accountants_test.py`` (meta-pytorch/opacus @ 88919b6677bb):
  line 104 ``test_rdp_accountant`` eps 7.32911117143 (sigma 1.5, q 0.04, 2250 steps, delta 1e-5);
  line 130 ``test_prv_accountant`` eps 6.777395712150674 (same mechanism, PRV accountant: near exact, like PLD);
  line 146 ``test_get_noise_multiplier_rdp_epochs`` sigma 1.416 for eps 8 (RDP);
  line 177 ``test_get_noise_multiplier_prv_epochs`` sigma 1.34765625 for eps 8 (PRV).
- TF Privacy ``tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py`` (tensorflow/privacy @ 03035d5d4a27),
  ``test_compute_dp_sgd_example_privacy`` (sigma 0.7, 1.2 epochs, delta 1e-5, no microbatching; with sampling
  q = 1e-2 the lib composes ceil(1.2 / 1e-2) = 120 steps, without it ceil(1.2) = 2 Gaussians, on dp-accounting's
  default RdpAccountant / PLDAccountant): line 86 RDP no sampling 10.8602036, line 88 RDP q=1e-2 3.2392676,
  line 90 PLD no sampling 10.1224946, line 92 PLD q=1e-2 2.4612381.
- dp-accounting 0.6.0 ``dp_accounting/pld/pld_privacy_accountant_test.py``: line 191 ``test_gaussian_basic``
  (Gaussian sqrt(3) composed 3 times: eps 1 at delta 0.126936) and line 218
  ``test_self_composed_subsampled_gaussian`` (PoissonSampled(0.2, Gaussian(0.5)) x 3: eps 1 at delta 0.15594).
- TF Privacy ``tutorials/README.md`` lines 106-109: MNIST DP-SGD, sigma 1.1, batch 256 of 60000, 60 epochs,
  "eps = 3.01 and delta = 1e-05". Not a test file: that number predates the tighter RDP -> DP conversion
  (Canonne, Kamath & Steinke 2020) that dp-accounting now uses (it gives ~2.60), so it is checked as an upper bound.
"""

from __future__ import annotations

import math

import pytest
import typer
from typer.testing import CliRunner

from fedlm.cli.privacy import privacy_app
from fedlm.core.errors import FedlmError
from fedlm.privacy.accounting import (
    PrivacyParameterError,
    dp_event,
    epsilon,
    noise_for_epsilon,
)
from fedlm.privacy.ledger import PrivacyLedger
from fedlm.privacy.plan import plan_client_dp, round_up

# ------------------------------------------------------------------------------------------------ goldens


def test_opacus_rdp_golden() -> None:
    """Opacus accountants_test.py:104 (the TF Privacy / Opacus headline number)."""
    assert epsilon(1.5, 0.04, int(90 / 0.04), 1e-5, "rdp") == pytest.approx(7.32911117143, abs=0.05)


def test_opacus_prv_golden_matches_pld() -> None:
    """Opacus accountants_test.py:130: PRV and PLD both compute the near-exact epsilon of the same mechanism."""
    assert epsilon(1.5, 0.04, 2250, 1e-5, "pld") == pytest.approx(6.777395712150674, abs=0.02)


@pytest.mark.parametrize(
    ("sampling_rate", "steps", "expected"),
    [(1.0, 2, 10.8602036), (1e-2, math.ceil(1.2 / 1e-2), 3.2392676)],  # compute_dp_sgd_privacy_test.py:86, :88
)
def test_tf_privacy_rdp_goldens(sampling_rate: float, steps: int, expected: float) -> None:
    assert epsilon(0.7, sampling_rate, steps, 1e-5, "rdp") == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("sampling_rate", "steps", "expected"),
    [(1.0, 2, 10.1224946), (1e-2, 120, 2.4612381)],  # compute_dp_sgd_privacy_test.py:90, :92
)
def test_tf_privacy_pld_goldens(sampling_rate: float, steps: int, expected: float) -> None:
    """TF Privacy used dp-accounting's 1e-4 discretisation; fedlm's default 1e-3 lands within 1e-4 of it."""
    assert epsilon(0.7, sampling_rate, steps, 1e-5, "pld") == pytest.approx(expected, abs=1e-4)


def test_tf_privacy_pld_golden_exact_at_fine_discretisation() -> None:
    assert epsilon(0.7, 1.0, 2, 1e-5, "pld", pld_interval=1e-4) == pytest.approx(10.1224946, abs=1e-6)


@pytest.mark.parametrize(
    ("sigma", "sampling_rate", "steps", "delta"),
    [(math.sqrt(3), 1.0, 3, 0.126936), (0.5, 0.2, 3, 0.15594)],  # pld_privacy_accountant_test.py:191, :218
)
def test_dp_accounting_pld_goldens(sigma: float, sampling_rate: float, steps: int, delta: float) -> None:
    assert epsilon(sigma, sampling_rate, steps, delta, "pld") == pytest.approx(1.0, abs=1e-3)


def test_tf_privacy_mnist_tutorial_bound() -> None:
    """tutorials/README.md:106-109 reports eps 3.01 with an older, looser conversion: today's RDP must not exceed it."""
    eps = epsilon(1.1, 256 / 60000, math.ceil(60 * 60000 / 256), 1e-5, "rdp")
    assert 2.5 < eps <= 3.01


def test_noise_for_epsilon_matches_opacus_rdp() -> None:
    """Opacus accountants_test.py:146: sigma 1.416 gives eps 8 over 90 epochs at q 0.04 (RDP)."""
    sigma = noise_for_epsilon(8.0, 0.04, 2250, 1e-5, "rdp")
    assert sigma == pytest.approx(1.416, rel=2e-3)
    eps = epsilon(sigma, 0.04, 2250, 1e-5, "rdp")
    assert 0.99 * 8.0 <= eps <= 8.0


def test_noise_for_epsilon_matches_opacus_prv_with_pld() -> None:
    """Opacus accountants_test.py:177: PRV's sigma 1.34765625 for eps 8; PLD is the same near-exact accounting."""
    sigma = noise_for_epsilon(8.0, 0.04, 2250, 1e-5, "pld")
    assert sigma == pytest.approx(1.34765625, rel=5e-3)
    eps = epsilon(sigma, 0.04, 2250, 1e-5, "pld")
    assert 0.99 * 8.0 <= eps <= 8.0


# ------------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize(("sigma", "sampling_rate", "steps"), [(1.5, 0.04, 2250), (1.0, 0.1, 100), (5.0, 1.0, 50)])
def test_pld_is_tighter_than_rdp(sigma: float, sampling_rate: float, steps: int) -> None:
    assert epsilon(sigma, sampling_rate, steps, 1e-5, "pld") <= epsilon(sigma, sampling_rate, steps, 1e-5, "rdp")


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_noise_for_epsilon_inverts_epsilon(target: float) -> None:
    sigma = noise_for_epsilon(target, 0.2, 200, 1e-6, "rdp")
    eps = epsilon(sigma, 0.2, 200, 1e-6, "rdp")
    assert eps <= target
    assert eps >= 0.99 * target
    assert epsilon(sigma * (1 - 2e-3), 0.2, 200, 1e-6, "rdp") > target  # and sigma is (nearly) the smallest


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_monotone(accountant: str) -> None:
    by_sigma = [epsilon(s, 0.05, 300, 1e-5, accountant) for s in (0.8, 1.0, 1.5, 2.5, 5.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == len(by_sigma)
    by_steps = [epsilon(1.0, 0.05, n, 1e-5, accountant) for n in (10, 100, 1000)]
    assert by_steps == sorted(by_steps)
    by_rate = [epsilon(1.0, q, 100, 1e-5, accountant) for q in (0.01, 0.1, 1.0)]
    assert by_rate == sorted(by_rate)


def test_edge_values() -> None:
    assert epsilon(0.0, 0.1, 10, 1e-5, "rdp") == math.inf
    assert epsilon(0.0, 1.0, 10, 1e-5, "pld") == math.inf
    assert epsilon(1.0, 0.1, 0, 1e-5, "pld") == 0.0
    assert noise_for_epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_dp_event_shape() -> None:
    event = dp_event(1.2, 0.1, 7)
    assert event.count == 7 and event.event.sampling_probability == 0.1
    assert event.event.event.noise_multiplier == 1.2
    plain = dp_event(1.2, 1.0, 7)  # q = 1: no sampling, plain composition of Gaussians
    assert plain.count == 7 and plain.event.noise_multiplier == 1.2


# ------------------------------------------------------------------------------------------------ ledger


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ledger_resumes_exactly(accountant: str) -> None:
    ledger = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5, accountant=accountant)
    assert ledger.epsilon() == 0.0
    for _ in range(30):
        ledger.record_round()
    state = ledger.state_dict()
    assert state == {"rounds": 30}
    resumed = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5, accountant=accountant)
    resumed.load_state_dict(state)
    for _ in range(20):
        ledger.record_round()
        resumed.record_round()
    assert resumed.rounds == ledger.rounds == 50
    assert resumed.epsilon() == ledger.epsilon() == epsilon(1.1, 0.1, 50, 1e-5, accountant)


def test_ledger_refuses_bad_state() -> None:
    ledger = PrivacyLedger(1.0, 0.1, 1e-5)
    for bad in ({}, {"rounds": -1}, {"rounds": 2.5}, {"rounds": True}):
        with pytest.raises(PrivacyParameterError, match="rounds"):
            ledger.load_state_dict(bad)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.2}, "sampling_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_bad_inputs_name_the_parameter(kwargs: dict, name: str) -> None:
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5, "accountant": "rdp", **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        epsilon(**args)
    assert isinstance(info.value, FedlmError)
    if "accountant" not in kwargs:
        ledger_args = {k: args[k] for k in ("noise_multiplier", "sampling_rate", "delta")}
        if name in ledger_args:
            with pytest.raises(FedlmError, match=f"`{name}`"):
                PrivacyLedger(**ledger_args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_noise_for_epsilon_refuses_nonpositive_target(target: float) -> None:
    with pytest.raises(PrivacyParameterError, match="target_epsilon"):
        noise_for_epsilon(target, 0.1, 10, 1e-5)


def test_noise_for_epsilon_reports_unreachable_target() -> None:
    with pytest.raises(PrivacyParameterError, match="unreachable") as info:
        noise_for_epsilon(1e-4, 1.0, 1000, 1e-5)
    message = str(info.value)
    assert "0.0001" in message and "10000" in message and "1000 rounds" in message and "\n" not in message


def test_plan_validates_clients_and_direction() -> None:
    with pytest.raises(FedlmError, match=r"`clients_per_round` \(8\) must be <= `num_clients` \(6\)"):
        plan_client_dp(rounds=10, clients_per_round=8, num_clients=6, delta=1e-5, target_epsilon=1.0)
    with pytest.raises(FedlmError, match="exactly one"):
        plan_client_dp(rounds=10, clients_per_round=2, num_clients=6, delta=1e-5)
    assert round_up(1.41601) == 1.417 and round_up(1.416) == 1.416 and round_up(0.0) == 0.0


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def privacy_cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(privacy_app, name="privacy")
    return app


def _plan(app: typer.Typer, *args: str):  # noqa: ANN202 - click's Result
    return CliRunner().invoke(app, ["privacy", "plan", *args])


def test_cli_plan_prints_a_sigma_for_a_reachable_target(privacy_cli: typer.Typer) -> None:
    result = _plan(privacy_cli, "--epsilon", "4", "--delta", "1e-5", "--rounds", "100", "--clients-per-round", "10", "--num-clients", "100")
    assert result.exit_code == 0, result.output
    assert "epsilon (RDP)" in result.output and "epsilon (PLD)" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│"))
    sigma = float(row.strip("│ ").split("│")[0])
    assert 0.99 * 4.0 <= epsilon(sigma, 0.1, 100, 1e-5, "rdp") <= 4.0
    assert f"{epsilon(sigma, 0.1, 100, 1e-5, 'rdp'):.4f}" in row


def test_cli_plan_reports_epsilon_for_a_sigma(privacy_cli: typer.Typer) -> None:
    result = _plan(privacy_cli, "--noise-multiplier", "1.2", "--rounds", "100", "--clients-per-round", "10", "--num-clients", "100")
    assert result.exit_code == 0, result.output
    assert f"{epsilon(1.2, 0.1, 100, 1e-5, 'rdp'):.4f}" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--epsilon", "0.0001", "--rounds", "1000", "--clients-per-round", "5", "--num-clients", "5"], "unreachable"),
        (["--epsilon", "4", "--delta", "1.5", "--rounds", "10", "--clients-per-round", "2", "--num-clients", "10"], "`delta`"),
        (["--epsilon", "4", "--rounds", "10", "--clients-per-round", "20", "--num-clients", "10"], "`num_clients`"),
    ],
)
def test_cli_plan_bad_input_is_one_error_line(privacy_cli: typer.Typer, args: list[str], needle: str) -> None:
    result = _plan(privacy_cli, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
