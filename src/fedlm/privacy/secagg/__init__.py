"""Secure aggregation: SecAgg+ (Bell et al. 2020) over Bonawitz et al. 2017's protocol, with fixed-point encoding.

``primitives`` (library calls), ``quantize``, ``graph``, ``wire`` (Flower records), ``client`` and ``server`` (the
protocol), ``simulate`` (one round in-process), ``round`` (encode updates, aggregate the sum), ``checks``, ``setup``.
"""
