"""Differential privacy for federated training.

:mod:`fedlm.privacy.accounting` holds the math: the epsilon of the Poisson-subsampled Gaussian mechanism composed
over rounds (client-level DP) or local steps (sample-level DP-SGD), its inverse (the noise multiplier for a target
epsilon), and a small stateful :class:`~fedlm.privacy.accounting.PrivacyLedger` that a server keeps across rounds and
checkpoints. :mod:`fedlm.privacy.plan` answers the planning question behind ``fedlm privacy plan``.

The numbers come from Google's ``dp-accounting`` library (RDP and PLD accountants); nothing here re-derives them.
"""
