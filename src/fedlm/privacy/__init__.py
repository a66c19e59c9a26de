"""Differential privacy for federated training: mechanisms that wrap aggregators, and the accountant that prices them.

- :mod:`fedlm.privacy.client_dp`: client-level DP as a wrapper around any aggregator (DP-FedAvg clipping and
  Gaussian noise, distributed noise shares for secure aggregation, adaptive clipping).
- :mod:`fedlm.privacy.accounting`: the math of the price: the epsilon of the Poisson-subsampled Gaussian mechanism
  composed over rounds (client-level DP) or local steps (sample-level DP-SGD), its inverse (the noise multiplier for
  a target epsilon), and the small stateful :class:`~fedlm.privacy.accounting.PrivacyLedger` a server keeps across
  rounds and checkpoints. The numbers come from Google's ``dp-accounting`` (RDP and PLD accountants).
- :mod:`fedlm.privacy.plan`: the planning question behind ``fedlm privacy plan`` (which noise multiplier gives
  epsilon <= X after N rounds with K of M clients per round, or the reverse).
"""
