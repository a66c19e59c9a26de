"""Client-level DP for a run: the noise multiplier (given, or solved from a target epsilon), the DP wrapper
around the configured aggregator, and the epsilon spent after each round.

Accounting: each round samples K of the M clients and releases one Gaussian-noised sum, so epsilon after t rounds
is that of t compositions of the Poisson-subsampled Gaussian mechanism with q = K / M and the configured noise
multiplier (McMahan et al. 2018, Sec. 3; fixed-size sampling accounted as Poisson sampling, the usual
approximation). Under adaptive clipping the configured multiplier is the total one: the update noise z_Delta and
the count noise compose to it (Andrew et al. 2021).
"""

from __future__ import annotations

from fedlm.aggregation.base import Aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.privacy.accounting import solve_noise_multiplier
from fedlm.privacy.client_dp import DifferentiallyPrivate
from fedlm.privacy.ledger import PrivacyLedger


def dp_account(config: ExperimentConfig, num_clients: int) -> PrivacyLedger | None:
    """The run's privacy ledger (``epsilon_after(rounds)``, ``delta``), or None without ``privacy.client_dp``; the
    noise multiplier is solved for ``target_epsilon`` when that is what was given."""
    dp = config.privacy.client_dp
    if dp is None:
        return None
    q = (config.federation.clients_per_round or num_clients) / num_clients
    privacy = config.privacy
    sigma = solve_noise_multiplier(
        "privacy.client_dp", dp.noise_multiplier, dp.target_epsilon, q, config.federation.rounds, privacy.delta, privacy.accountant
    )
    return PrivacyLedger(sigma, q, privacy.delta, privacy.accountant)


def wrap_with_dp(inner: Aggregator, config: ExperimentConfig, num_clients: int, account: PrivacyLedger | None = None) -> Aggregator:
    """``inner`` wrapped in client-level DP when ``privacy.client_dp`` is set, else ``inner`` itself.

    ``account`` is :func:`dp_account`'s answer when the caller has it already (else it is solved here). The wrapper
    refuses an ``inner`` it cannot wrap; the config rules (:mod:`fedlm.config.rules`) refuse such a config at load.
    """
    dp = config.privacy.client_dp
    account = account or dp_account(config, num_clients)
    if dp is None or account is None:
        return inner
    params = {
        "noise_multiplier": account.noise_multiplier,
        "clip": dp.clip,
        "mode": dp.mode,
        "adaptive": dp.adaptive,
        "target_quantile": dp.target_quantile,
        "clip_lr": dp.clip_lr,
        "count_noise_std": dp.count_noise_std,
        "expected_clients": config.federation.clients_per_round or num_clients,
        "seed": config.seed,
    }
    return DifferentiallyPrivate.from_config(inner, params, section="privacy.client_dp")
