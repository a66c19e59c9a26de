"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, composed over rounds or steps.

One mechanism covers both kinds of DP that fedlm trains with:

- client-level DP in federated learning (DP-FedAvg; McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially
  Private Recurrent Language Models", ICLR, Sec. 3): every round each client joins with probability
  ``q = clients_per_round / num_clients``, its update is clipped to norm C and the server adds N(0, (sigma C)^2) to
  the sum, so ``sampling_rate = q``, ``steps = rounds`` and neighbouring datasets differ by one client's data;
- sample-level DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS): every step each example
  joins the batch with probability ``q = batch_size / n``, so ``sampling_rate = q`` and ``steps`` = local steps.

``noise_multiplier`` (sigma) is the noise standard deviation divided by the clipping norm (the L2 sensitivity of
the sum). ``sampling_rate = 1`` means no subsampling: plain composition of Gaussian mechanisms. Neighbouring is
add-or-remove-one (dp-accounting's default). The analysis assumes Poisson sampling; a sampler that picks exactly K
clients is usually accounted this way too (as McMahan et al. and TF Privacy do), which is an approximation.

Two accountants from Google's ``dp-accounting``:

- ``"rdp"``: Renyi DP (Mironov 2017, "Renyi Differential Privacy", CSF, Prop. 1 for the Gaussian and Prop. 3 for
  the conversion) with the sampled-Gaussian RDP of Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the
  Sampled Gaussian Mechanism" (Sec. 3.3), over dp-accounting's default orders and its improved RDP -> (eps, delta)
  conversion (Canonne, Kamath & Steinke 2020). Fast (tens of ms), a valid upper bound, a little loose.
- ``"pld"``: privacy loss distributions (Koskela, Jalko & Honkela 2020; Doroshenko, Ghazi, Kamath, Kumar & Manurangsi
  2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions", PETS), composed by FFT.
  Near-exact and tighter than RDP; the loss is discretised with step ``pld_interval`` and rounded pessimistically,
  so the epsilon stays an upper bound. :data:`PLD_VALUE_DISCRETIZATION` (1e-3) moves epsilon by about 1e-3 from
  dp-accounting's own default (1e-4) and is ten times faster, which keeps a bisection on sigma to about a second.
  PLD grows slow when sigma is far below ~0.3 with a large sampling rate (a huge epsilon).

The functions here are pure; :class:`fedlm.privacy.ledger.PrivacyLedger` is the one stateful accountant a run keeps
(as Opacus separates ``accountants/analysis/rdp.py`` from ``accountants/rdp.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import dp_accounting
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlm.core.errors import FedlmError

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantName)
PLD_VALUE_DISCRETIZATION = 1e-3
"""Default PLD loss discretisation step: epsilon within ~1e-3 of dp-accounting's 1e-4, about ten times faster."""
MAX_NOISE_MULTIPLIER = 1e4
"""The largest sigma :func:`noise_for_epsilon` tries before it calls a target unreachable."""
SIGMA_RTOL = 1e-3
"""Relative width of the final bisection bracket on sigma."""


class PrivacyParameterError(FedlmError, ValueError):
    """A privacy parameter out of range: a ValueError for callers, one ``error:`` line in the CLI."""


# --------------------------------------------------------------------------------------------- validation


def _check_noise_multiplier(noise_multiplier: float) -> float:
    if not isinstance(noise_multiplier, (int, float)) or isinstance(noise_multiplier, bool):
        raise PrivacyParameterError(f"`noise_multiplier` must be a number >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyParameterError(f"`noise_multiplier` must be a finite number >= 0 (noise std / clipping norm), got {noise_multiplier}")
    return float(noise_multiplier)


def _check_sampling_rate(sampling_rate: float) -> float:
    if not isinstance(sampling_rate, (int, float)) or isinstance(sampling_rate, bool) or not 0 < sampling_rate <= 1:
        raise PrivacyParameterError(
            f"`sampling_rate` must lie in (0, 1] (clients_per_round / num_clients, or 1 for no sampling), got {sampling_rate}"
        )
    return float(sampling_rate)


def _check_steps(steps: int) -> int:
    try:
        count = operator.index(steps)
    except TypeError:
        raise PrivacyParameterError(f"`steps` must be a whole number of rounds or steps >= 0, got {steps!r}") from None
    if isinstance(steps, bool) or count < 0:
        raise PrivacyParameterError(f"`steps` must be a whole number of rounds or steps >= 0, got {steps!r}")
    return count


def _check_delta(delta: float) -> float:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        raise PrivacyParameterError(f"`delta` must lie strictly between 0 and 1 (well below 1 / the number of clients or examples), got {delta}")
    return float(delta)


def _check_accountant(accountant: str) -> AccountantName:
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(f"`accountant` must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return accountant  # type: ignore[return-value]


def _check_pld_interval(pld_interval: float) -> float:
    if not isinstance(pld_interval, (int, float)) or not 0 < pld_interval <= 0.1:
        raise PrivacyParameterError(f"`pld_interval` must lie in (0, 0.1], got {pld_interval}")
    return float(pld_interval)


def check_mechanism(
    noise_multiplier: float, sampling_rate: float, delta: float, accountant: str, pld_interval: float = PLD_VALUE_DISCRETIZATION
) -> tuple[float, float, float, AccountantName, float]:
    """The mechanism's parameters validated (:class:`PrivacyParameterError` naming the bad one) and normalised."""
    return (
        _check_noise_multiplier(noise_multiplier),
        _check_sampling_rate(sampling_rate),
        _check_delta(delta),
        _check_accountant(accountant),
        _check_pld_interval(pld_interval),
    )


# --------------------------------------------------------------------------------------------- the math


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DP event of ``steps`` rounds (or steps) of the Poisson-subsampled Gaussian mechanism.

    ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``; with ``q = 1`` the sampling is dropped and the event
    is the plain composition ``SelfComposed(Gaussian(sigma), steps)``. Client-level DP (McMahan et al. 2018):
    ``q = clients_per_round / num_clients``, ``steps = rounds``. Sample-level DP-SGD (Abadi et al. 2016):
    ``q = batch_size / n``, ``steps`` = local steps.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    count = _check_steps(steps)
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    return dp_accounting.SelfComposedDpEvent(event, count)


class _DropExcludedOrderWarnings(logging.Filter):
    """Drops dp-accounting's "failed to converge ... Excluding this order" notes: the order is skipped, as it says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


@contextlib.contextmanager
def _quiet_rdp_orders() -> Iterator[None]:
    """Silence :class:`_DropExcludedOrderWarnings` messages on the ``absl`` logger while an epsilon is computed."""
    absl_logger, drop = logging.getLogger("absl"), _DropExcludedOrderWarnings()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


def _new_accountant(accountant: AccountantName, pld_interval: float) -> dp_accounting.PrivacyAccountant:
    """An empty dp-accounting accountant: RDP over the default orders, or PLD with step ``pld_interval``."""
    if accountant == "rdp":
        return RdpAccountant()
    return PLDAccountant(value_discretization_interval=pld_interval)


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    pld_interval: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    """The epsilon of :func:`dp_event` at ``delta``: ``inf`` for sigma = 0, ``0`` for no steps.

    ``accountant="rdp"``: Mironov 2017 / Mironov, Talwar & Zhang 2019 over dp-accounting's default orders.
    ``accountant="pld"``: privacy loss distributions (Doroshenko et al. 2022) discretised with ``pld_interval``.
    """
    event = dp_event(noise_multiplier, sampling_rate, steps)
    delta = _check_delta(delta)
    kind = _check_accountant(accountant)
    interval = _check_pld_interval(pld_interval)
    if event.count == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with _quiet_rdp_orders():
        return float(_new_accountant(kind, interval).compose(event).get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    pld_interval: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    """The smallest noise multiplier (to relative tolerance :data:`SIGMA_RTOL`) whose epsilon is <= ``target_epsilon``.

    Epsilon falls as sigma grows, so a bisection finds it: the upper end of the bracket starts at 1 (for PLD at the
    RDP answer, which PLD rarely needs more than) and doubles until it is feasible, the lower end shrinks until it is
    not, then the bracket is halved to width ``SIGMA_RTOL * sigma``. The upper (feasible) end is returned, so
    ``epsilon(noise_for_epsilon(x, ...), ...) <= x``. Raises :class:`PrivacyParameterError` when no sigma up to
    :data:`MAX_NOISE_MULTIPLIER` reaches the target.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)):
        raise PrivacyParameterError(f"`target_epsilon` must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < target_epsilon < math.inf:
        raise PrivacyParameterError(f"`target_epsilon` must be a finite number > 0, got {target_epsilon}")
    q = _check_sampling_rate(sampling_rate)
    if _check_steps(steps) == 0:
        return 0.0
    delta = _check_delta(delta)
    kind = _check_accountant(accountant)

    def eps_at(sigma: float) -> float:
        return epsilon(sigma, q, steps, delta, kind, pld_interval=pld_interval)

    target = float(target_epsilon)
    if kind == "rdp":
        bracket = _bracket(eps_at, target, start=1.0, shrink=0.5)
    else:  # PLD is tighter than RDP: start at the RDP answer and step down gently (tiny sigmas are slow in PLD)
        try:
            start = noise_for_epsilon(target, q, steps, delta, "rdp")
        except PrivacyParameterError:
            start = MAX_NOISE_MULTIPLIER
        bracket = _bracket(eps_at, target, start=start, shrink=0.8)
    if bracket is None:
        raise PrivacyParameterError(
            f"`target_epsilon` {target:g} is unreachable: even noise_multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon "
            f"{eps_at(MAX_NOISE_MULTIPLIER):.4g} after {steps} rounds/steps at sampling_rate {q:g} and delta {delta:g} "
            f"({kind}); raise the target epsilon or delta, or use fewer rounds or a smaller sampling rate"
        )
    lo, hi = bracket
    while hi - lo > SIGMA_RTOL * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def solve_noise_multiplier(
    field: str,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """The noise multiplier of a config section that gives either ``noise_multiplier`` or ``target_epsilon``: the
    given one, or :func:`noise_for_epsilon` of the target. An unreachable target is a FedlmError naming
    ``<field>.target_epsilon`` (``field`` is the section, e.g. ``privacy.client_dp``)."""
    if noise_multiplier is not None:
        return noise_multiplier
    if target_epsilon is None:
        raise PrivacyParameterError(f"give exactly one of `{field}.noise_multiplier` or `{field}.target_epsilon`")
    try:
        return noise_for_epsilon(target_epsilon, sampling_rate, steps, delta, accountant)
    except FedlmError as exc:
        raise FedlmError(f"`{field}.target_epsilon` {target_epsilon} cannot be reached: {exc}") from None


def _bracket(eps_at: Callable[[float], float], target: float, *, start: float, shrink: float) -> tuple[float, float] | None:
    """``(lo, hi)`` with ``eps_at(lo) > target >= eps_at(hi)`` (``lo`` = 0 below 1e-6), or None past the sigma cap."""
    hi = min(max(start, 1e-6), MAX_NOISE_MULTIPLIER)
    while eps_at(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            return None
        hi = min(2.0 * hi, MAX_NOISE_MULTIPLIER)
    lo = shrink * hi
    while lo > 1e-6 and eps_at(lo) <= target:
        hi, lo = lo, shrink * lo
    return (lo if lo > 1e-6 else 0.0), hi
