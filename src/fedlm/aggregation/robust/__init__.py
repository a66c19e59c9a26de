"""Byzantine-robust server steps: coordinate-wise median and trimmed mean, Krum and Multi-Krum, norm bounding, FLAME.

Each rule is one file (a pure function for the math and a thin registered :class:`~fedlm.aggregation.base.Aggregator`);
``geometry.py`` holds what they share: which updates take part, the space distances and norms are measured in
(LoRA products), and the server step w + server_lr * robust_delta.
"""
