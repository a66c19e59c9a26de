"""Differential privacy for federated training: mechanisms that wrap aggregators, and the accountant that prices them.

- :mod:`fedlm.privacy.client_dp`: client-level DP as a wrapper around any aggregator (DP-FedAvg clipping and
  Gaussian noise, distributed noise shares for secure aggregation, adaptive clipping).
- :mod:`fedlm.privacy.accounting`: the math of the price: the epsilon of the Poisson-subsampled Gaussian mechanism
  composed over rounds (client-level DP) or local steps (sample-level DP-SGD), its inverse (the noise multiplier for
  a target epsilon, solved once by :func:`~fedlm.privacy.accounting.solve_noise_multiplier` for every config
  section). The numbers come from Google's ``dp-accounting`` (RDP and PLD accountants).
- :mod:`fedlm.privacy.ledger`: :class:`~fedlm.privacy.ledger.PrivacyLedger`, the one stateful accountant a run keeps
  (``epsilon_after(rounds)``, ``delta``, saved in checkpoints); :func:`fedlm.privacy.setup.dp_account` builds it.
- :mod:`fedlm.privacy.plan`: the planning question behind ``fedlm privacy plan`` (which noise multiplier gives
  epsilon <= X after N rounds with K of M clients per round, or the reverse).
"""
