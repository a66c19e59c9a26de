"""Per-round concerns of the server loop, each one :class:`~fedlm.core.round.RoundObserver` with one job."""
