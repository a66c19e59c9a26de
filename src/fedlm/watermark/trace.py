"""Leak tracing: which client's marked copy is this? Each client's own trigger set is tested on the suspect model.

Client k's download carries the shared mark and k's own (:mod:`fedlm.watermark.rounds`). A suspect model is tested
against every client's trigger set (its key HMAC(secret, "client/k")); under the null hypothesis that the model
is not k's copy, k's count of right answers is Binomial(n, 1/K). The leak is attributed to the client with the
smallest p-value when it stays below ``alpha`` after the Bonferroni correction over the M clients tested
(p_min * M < alpha); otherwise no client is named.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlm.core.errors import FedlmError
from fedlm.watermark.triggers import client_label, trigger_set
from fedlm.watermark.verify import DEFAULT_ALPHA, Verification, verify_model, verify_triggers

REGISTRY = "clients.json"  # RUN_DIR/watermark/clients.json, written by the server at the start of the run


@dataclass(frozen=True)
class Trace:
    """The shared watermark's verification and each client's, and the client named at ``alpha`` (None: none)."""

    shared: Verification
    clients: dict[str, Verification]
    alpha: float

    @property
    def leaked(self) -> str | None:
        """The client whose copy this is: the smallest p-value, Bonferroni-corrected below ``alpha``."""
        if not self.clients:
            return None
        client = min(self.clients, key=lambda c: self.clients[c].p_value)
        return client if self.clients[client].p_value * len(self.clients) < self.alpha else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "shared": self.shared.as_dict(),
            "clients": {c: v.as_dict() for c, v in self.clients.items()},
            "alpha": self.alpha,
            "leaked": self.leaked,
        }


def trace_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    secret: str,
    clients: Sequence[str],
    size: int,
    client_size: int,
    alpha: float = DEFAULT_ALPHA,
) -> Trace:
    """Test ``model`` against the shared trigger set and every client's own one."""
    shared = verify_model(model, tokenizer, device, secret, size)
    per_client = {c: verify_triggers(model, tokenizer, device, trigger_set(secret, client_label(c), client_size), client_label(c)) for c in clients}
    return Trace(shared, per_client, alpha)


def has_registry(run_root: Path) -> bool:
    """Whether the run traced leaks (wrote its client registry)."""
    return (run_root / "watermark" / REGISTRY).is_file()


def read_registry(run_root: Path) -> dict[str, Any]:
    """The run's client registry (``RUN_DIR/watermark/clients.json``): client names and trigger-set sizes."""
    path = run_root / "watermark" / REGISTRY
    if not path.is_file():
        raise FedlmError(
            f"{run_root} has no {path.relative_to(run_root)}: the run did not trace leaks (`watermark.per_client: true`); pass --clients"
        )
    registry = json.loads(path.read_text())
    if not isinstance(registry.get("clients"), list) or not registry["clients"]:
        raise FedlmError(f"{path}: `clients` must list the run's client names")
    return registry
