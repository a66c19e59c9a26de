"""Client-level DP for a run: the noise multiplier (given, or solved from a target epsilon), the DP wrapper
around the configured aggregator, and the epsilon spent after each round.

Accounting: each round samples K of the M clients and releases one Gaussian-noised sum, so epsilon after t rounds
is that of t compositions of the Poisson-subsampled Gaussian mechanism with q = K / M and the configured noise
multiplier (McMahan et al. 2018, Sec. 3; fixed-size sampling accounted as Poisson sampling, the usual
approximation). Under adaptive clipping the configured multiplier is the total one: the update noise z_Delta and
the count noise compose to it (Andrew et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.aggregation.base import Aggregator
from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.privacy.accounting import epsilon, noise_for_epsilon
from fedlm.privacy.client_dp import DifferentiallyPrivate


@dataclass(frozen=True)
class DPAccount:
    """What a run needs to report epsilon: the noise multiplier, the client sampling rate, delta, the accountant."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    accountant: str

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds."""
        return epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant)


def dp_account(config: ExperimentConfig, num_clients: int) -> DPAccount | None:
    """The run's DP accounting, solving the noise multiplier for ``target_epsilon`` when that is what was given."""
    dp = config.privacy.client_dp
    if dp is None:
        return None
    per_round = config.federation.clients_per_round or num_clients
    q = per_round / num_clients
    sigma = dp.noise_multiplier
    if sigma is None:
        assert dp.target_epsilon is not None  # noqa: S101 - the config validator requires one of them
        try:
            sigma = noise_for_epsilon(dp.target_epsilon, q, config.federation.rounds, config.privacy.delta, config.privacy.accountant)
        except FedlmError as exc:
            raise FedlmError(f"`privacy.client_dp.target_epsilon` {dp.target_epsilon} cannot be reached: {exc}") from None
    return DPAccount(sigma, q, config.privacy.delta, config.privacy.accountant)


def wrap_with_dp(inner: Aggregator, config: ExperimentConfig, num_clients: int, account: DPAccount | None = None) -> Aggregator:
    """``inner`` wrapped in client-level DP when ``privacy.client_dp`` is set, else ``inner`` itself.

    ``account`` is :func:`dp_account`'s answer when the caller has it already (else it is solved here). The wrapper
    refuses an ``inner`` it cannot wrap; the config rules (:mod:`fedlm.config.rules`) refuse such a config at load.
    """
    dp = config.privacy.client_dp
    account = account or dp_account(config, num_clients)
    if dp is None or account is None:
        return inner
    params = {
        "noise_multiplier": account.noise_multiplier, "clip": dp.clip, "mode": dp.mode, "adaptive": dp.adaptive,
        "target_quantile": dp.target_quantile, "clip_lr": dp.clip_lr, "count_noise_std": dp.count_noise_std,
        "expected_clients": config.federation.clients_per_round or num_clients, "seed": config.seed,
    }
    return DifferentiallyPrivate.from_config(inner, params, section="privacy.client_dp")
