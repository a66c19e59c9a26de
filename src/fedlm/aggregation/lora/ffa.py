"""``ffa`` LoRA aggregation: A frozen at a shared seeded random init, only B trained and sent.

FFA-LoRA, Sun, Qin, Li & Ding 2024, "Improving LoRA in Privacy-preserving Federated Learning" (ICLR), Sec. 4:
with A fixed and identical on every client, Delta W_k = (alpha / r) B_k A is linear in B_k, so
sum_k p_k Delta W_k = (alpha / r) (sum_k p_k B_k) A: plain averaging of B is exact, and only B (half of the LoRA
parameters) crosses the wire. A client of smaller rank zero-pads B; the padded mean stays exact because the
missing columns multiply the same rows of the shared A.
"""

from __future__ import annotations

from fedlm.aggregation.lora.mode import LoraMode, register_lora_mode


@register_lora_mode
class FfaLora(LoraMode):
    """B only; the aggregator works directly on B (the base class's identity mapping), which is exact."""

    name = "ffa"
    space = "LoRA factor B (A frozen and shared), exact"
