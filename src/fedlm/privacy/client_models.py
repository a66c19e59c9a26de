"""Saving clients' local models for the privacy audit (``eval.audit.client_model``).

Client-level DP (McMahan et al. 2018) protects what the server *releases*; a client's own local model after
training is not covered, and auditing it shows how much the client's data leaks where no DP noise is added. The
server never holds that model, but it holds everything that defines it: a client's local adapter after a round is
the adapter it downloaded that round plus its update, ``local = start + delta`` (``ClientUpdate.tensors`` are
``local - start`` per adapter tensor, so this holds for every LoRA mode: naive, ffa with its frozen A absent from
the trainable state, exact, and a client of smaller rank whose start is the global adapter cut to its rank).

:class:`ClientModelSaver` is a round observer: it writes ``RUN_DIR/audit/client_<name>.safetensors``
(float32, metadata ``client`` and ``round``) for the audited client every round it takes part (so the file holds
its model after its last round) and for every client of the final round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedlm.core.round import RoundObserver, RoundRecord
from fedlm.core.update import ClientUpdate, TensorDict


def client_model_path(run_root: Path, client: str) -> Path:
    """Where a client's saved local adapter lives: ``RUN_DIR/audit/client_<name>.safetensors``."""
    return Path(run_root) / "audit" / f"client_{re.sub(r'[^A-Za-z0-9_.-]', '_', client)}.safetensors"


def local_state(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """A client's local adapter: the state it started the round from plus its update, in float32."""
    return {name: start[name].to(torch.float32) + d.to(torch.float32) for name, d in delta.items()}


def load_client_model(path: Path) -> tuple[TensorDict, int]:
    """A saved local adapter and the round it is from."""
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        round_num = int((f.metadata() or {}).get("round", 0))
    return state, round_num


@dataclass
class ClientModelSaver(RoundObserver):
    """The round observer that saves local adapters for the audit (see the module docstring)."""

    run_root: Path
    final_round: int
    client: str

    def on_round(self, record: RoundRecord) -> None:
        self.save(record.round, {client: task.state for client, task in record.tasks.items()}, record.accepted)

    def save(self, round_num: int, starts: Mapping[str, Mapping[str, torch.Tensor]], accepted: Sequence[ClientUpdate]) -> None:
        """Save the local adapter (start + update) of the audited client, and of every client in the last round."""
        for update in accepted:
            if update.client_id != self.client and round_num != self.final_round:
                continue
            path = client_model_path(self.run_root, update.client_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in local_state(starts[update.client_id], update.tensors).items()}
            save_file(state, str(path), metadata={"client": update.client_id, "round": str(round_num)})
