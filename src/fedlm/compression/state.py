"""The run's aggregator with the compression's state beside its own: the clients' error-feedback residuals (in the
simulation; over Flower they stay on the nodes) and the downlink replica, so that checkpoints hold them and a resumed
run continues exactly. The round itself runs on the inner aggregator (:func:`fedlm.experiment.build_server_loop`
unwraps it); only the checkpoints see this wrapper."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlm.aggregation.base import AggregationResult, Aggregator, ByzantineBound
from fedlm.compression.downlink import DownlinkState
from fedlm.core.client_state import ClientStates
from fedlm.core.task import ClientContext, TrainerHook
from fedlm.core.update import ClientUpdate


class WithCompressionState(Aggregator):
    """Delegates everything to ``inner``; adds ``residuals`` (client -> its residual) and ``downlink`` (the replica
    and what each client was sent) to the saved state."""

    name = "compression_state"

    def __init__(self, inner: Aggregator) -> None:
        super().__init__(inner.params)
        self.inner = inner
        self.residuals = ClientStates()  # client -> residual; on disk under RUN_DIR/clients/ in a simulated run
        self.downlink: DownlinkState | None = None  # set when the run is built (its replica starts at the initial adapter)

    # The inner aggregator's capabilities, read through.
    @property
    def needs_stable_parameter_space(self) -> bool:  # type: ignore[override]
        return self.inner.needs_stable_parameter_space

    @property
    def needs_server_update(self) -> bool:  # type: ignore[override]
        return self.inner.needs_server_update

    @property
    def needs_individual_updates(self) -> str | None:  # type: ignore[override]
        return self.inner.needs_individual_updates

    @property
    def uploads_extras(self) -> str | None:  # type: ignore[override]
        return self.inner.uploads_extras

    @property
    def byzantine_bound(self) -> ByzantineBound | None:  # type: ignore[override]
        return self.inner.byzantine_bound

    @property
    def returns_mean_update(self) -> bool:  # type: ignore[override]
        return self.inner.returns_mean_update

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        return self.inner.aggregate(global_params, updates)

    def check_config(self, config: Any) -> None:
        self.inner.check_config(config)

    def set_server_update(self, update: ClientUpdate) -> None:
        self.inner.set_server_update(update)

    def start(self, client_names: Sequence[str]) -> None:
        self.inner.start(client_names)

    def trainer_hooks(self) -> list[TrainerHook]:
        return self.inner.trainer_hooks()

    def client_context(self, client_id: str, round_num: int) -> ClientContext:
        return self.inner.client_context(client_id, round_num)

    def state_dict(self) -> dict[str, Any]:
        """``{"inner": inner state, "residuals": {client: {name: tensor}}, "downlink": its state (when used)}``."""
        state = {"inner": self.inner.state_dict(), "residuals": self.residuals.checkpoint_state()}
        if self.downlink is not None:
            state["downlink"] = self.downlink.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"inner", "residuals", "downlink"}
        if unknown:
            raise ValueError(f"compression state got unknown keys {sorted(unknown)}")
        self.inner.load_state_dict(state.get("inner", {}))
        self.residuals.load(state.get("residuals", {}))
        if "downlink" in state:
            self.downlink = DownlinkState({})
            self.downlink.load_state_dict(state["downlink"])
