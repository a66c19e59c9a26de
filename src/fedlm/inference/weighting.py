"""The personal model's weight per input (``inference.weight: auto``): FedDPA's instance-wise dynamic weighting.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024), weight the local adapter
per test instance by how similar the instance is to the client's own training data, so that inputs like the
client's data lean on the personal model and shifted inputs on the global one. fedlm's form:

    h(x) = mean over x's tokens of the base model's last hidden state (adapters disabled)
    c_k  = mean of h over client k's training examples (``clients/<k>/profile.safetensors``, key ``centroid``)
    w(x) = max_weight * max(0, cos(h(x), c_k))

The profile is :func:`fedlm.personalization.profile.compute_profile` (the prompts of the client's training data);
:func:`mean_pooled_hidden` computes the same statistic for a (left-padded) batch of requests (a test holds the two
equal); this package does not import personalization, which may use the scoring API of :mod:`fedlm.inference.mix`.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from fedlm.core.errors import FedlmError


def mean_pooled_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over real (mask 1) tokens of the base model's last hidden state, adapters disabled. Shape (B, H), float32.

    ``model`` is a ``PeftModel`` (its adapters are switched off for the call) or a plain model.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each row's tokens at 0.. as unpadded
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, "output_hidden_states": True}
    with torch.no_grad():
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                out = model(**inputs)
        else:
            out = model(**inputs)
    hidden = out.hidden_states[-1].float()  # (B, T, H), after the final norm
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)


def auto_weight(pooled: torch.Tensor, centroid: torch.Tensor | None, max_weight: float, client: str) -> torch.Tensor:
    """``max_weight * max(0, cos(h, c))`` per row of ``pooled`` (B, H) -> (B,). A client without a centroid is refused."""
    if centroid is None:
        raise FedlmError(
            f"`inference.weight: auto` needs client {client!r}'s profile (clients/{client}/profile.safetensors), which this run "
            "did not save; set a fixed `inference.weight` (e.g. --weight 0.5)"
        )
    cos = torch.nn.functional.cosine_similarity(pooled, centroid.to(pooled.device, pooled.dtype).unsqueeze(0), dim=-1)  # (B,)
    return max_weight * cos.clamp(min=0.0)
