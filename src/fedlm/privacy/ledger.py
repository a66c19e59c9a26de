"""The one stateful privacy accountant of a run: how much (epsilon, delta) it has spent after each round.

The maths is pure and lives in :mod:`fedlm.privacy.accounting`; this class only remembers the mechanism (noise
multiplier, sampling rate, delta, accountant) and the rounds composed so far, as Opacus keeps
``accountants/analysis/rdp.py`` apart from ``accountants/rdp.py``. The federation reads it through
:meth:`PrivacyLedger.epsilon_after` and :attr:`PrivacyLedger.delta`; :func:`fedlm.privacy.setup.dp_account` builds
it from a config.
"""

from __future__ import annotations

from typing import Any

from fedlm.privacy.accounting import PLD_VALUE_DISCRETIZATION, AccountantName, PrivacyParameterError, check_mechanism, epsilon


class PrivacyLedger:
    """The privacy spent by a run with a fixed noise multiplier and sampling rate, one entry per round.

    The ledger holds only the round count: :meth:`epsilon` recomposes ``rounds`` rounds from scratch (cheap for RDP,
    and for PLD the same self-composition every time), so a run resumed from :meth:`state_dict` reports exactly the
    epsilon an uninterrupted run would.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        accountant: AccountantName = "rdp",
        *,
        pld_interval: float = PLD_VALUE_DISCRETIZATION,
    ) -> None:
        checked = check_mechanism(noise_multiplier, sampling_rate, delta, accountant, pld_interval)
        self.noise_multiplier, self.sampling_rate, self.delta, self.accountant, self.pld_interval = checked
        self.rounds = 0

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (whatever the ledger has recorded)."""
        return epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant, pld_interval=self.pld_interval)

    def record_round(self) -> None:
        """Compose one more round of the subsampled Gaussian mechanism."""
        self.rounds += 1

    def epsilon(self) -> float:
        """The epsilon spent after :attr:`rounds` rounds at :attr:`delta`."""
        return self.epsilon_after(self.rounds)

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs: the number of rounds recorded."""
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the round count saved by :meth:`state_dict`."""
        rounds = state.get("rounds") if isinstance(state, dict) else None
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise PrivacyParameterError(
                f"privacy ledger state needs `rounds`, a whole number >= 0, got {rounds!r}; "
                "resume from a checkpoint written by PrivacyLedger.state_dict()"
            )
        self.rounds = rounds

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(noise_multiplier={self.noise_multiplier}, sampling_rate={self.sampling_rate}, "
            f"delta={self.delta}, accountant={self.accountant!r}, rounds={self.rounds})"
        )
