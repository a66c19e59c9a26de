"""SCAFFOLD: stochastic controlled averaging with client and server control variates.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML), Algorithm 1. Client i starts from the server model x, corrects every local gradient
g_i(y) -> g_i(y) - c_i + c (line 10), and afterwards updates its control variate (line 12):
    option I:  c_i+ = g_i(x), the gradient at the server model (here: mean over the round's batches);
    option II: c_i+ = c_i - c + (x - y_i) / (K eta_l).
It uploads Delta y_i = y_i - x and Delta c_i = c_i+ - c_i (line 13). The server (lines 16-17) sets
    x <- x + eta_g * sum_i p_i Delta y_i,    c <- c + (1/N) sum_{i in S} Delta c_i,
with N the number of clients, so c stays the mean of all c_i. Differences from the paper, all documented:
Delta y is weighted by examples (p_i = n_i / n, as FedAvg) rather than uniformly; with the default AdamW local
optimizer the corrected gradient goes through Adam's normalisation, so option I (the default here; one extra
forward/backward per local step) is required there, and option II, whose displacement estimate of the gradient
holds only for SGD steps, needs ``federation.optimizer: sgd``; the correction is added after gradient clipping;
with a learning-rate schedule, K eta_l is the sum of the round's step sizes.
In the simulation each client's c_i is client memory held in this aggregator's state (on disk under
``RUN_DIR/clients/<name>/`` while the client is not in the round, :mod:`fedlm.core.client_state`);
in round 1 c = c_i = 0 on both sides, so nothing is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from fedlm.aggregation.base import AggregationResult, Aggregator, AggregatorParams, register_aggregator
from fedlm.aggregation.lora_structure import truncate_to_rank
from fedlm.aggregation.weights import example_weights, weighted_sum
from fedlm.core.client_state import ClientStates
from fedlm.core.errors import FedlmError
from fedlm.core.task import ClientContext, HookOutput, TrainerHook
from fedlm.core.update import ClientUpdate, TensorDict

SERVER_C, CLIENT_C, DELTA_C = "c.", "c_i.", "delta_c."


def client_control_update(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    step_size_sum: float,
    option: Literal["I", "II"],
    start_gradient: Mapping[str, torch.Tensor] | None = None,
) -> TensorDict:
    """c_i+ (Algorithm 1, line 12): option I the gradient at x; option II c_i - c + (x - y) / (K eta_l)."""
    if option == "I":
        if start_gradient is None:
            raise ValueError("SCAFFOLD option I needs the gradient at the server model")
        return {n: start_gradient[n].to(torch.float32).clone() for n in c_i}
    return {n: c_i[n] - c[n] + (x[n].to(torch.float32) - y[n].to(torch.float32)) / step_size_sum for n in c_i}


def scaffold_server_step(
    params: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    delta_cs: Sequence[Mapping[str, torch.Tensor]],
    c: Mapping[str, torch.Tensor],
    server_lr: float,
    num_clients: int,
) -> tuple[TensorDict, TensorDict]:
    """(x + eta_g sum_i p_i Delta y_i, c + (1/N) sum_i Delta c_i): Algorithm 1, lines 16-17."""
    mean_delta = weighted_sum(deltas, example_weights(num_examples))
    new_x = {n: (params[n].to(torch.float32) + server_lr * mean_delta[n]).to(params[n].dtype) for n in params}
    summed_c = weighted_sum(delta_cs, [1.0] * len(delta_cs))
    new_c = {n: c[n] + summed_c[n] / num_clients for n in c}
    return new_x, new_c


class ScaffoldHook(TrainerHook):
    """The client side: gradient correction during local steps, control variate update at the end."""

    def __init__(self, option: Literal["I", "II"]) -> None:
        self.option = option
        self.needs_start_gradient = option == "I"
        self._c: TensorDict = {}
        self._c_i: TensorDict = {}
        self._rank: int | None = None

    def begin(self, context: ClientContext, global_params: Mapping[str, torch.Tensor]) -> None:
        zeros = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in global_params.items()}
        self._c = {n: context.extras.get(SERVER_C + n, zeros[n]).to(torch.float32) for n in zeros}
        self._c_i = {n: context.memory.get(CLIENT_C + n, zeros[n]).to(torch.float32) for n in zeros}
        self._rank = context.rank

    def correct_gradients(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for name, param in params.items():
            if param.grad is not None:
                param.grad.add_((self._c[name] - self._c_i[name]).to(param.grad.dtype))

    def end(
        self,
        params: Mapping[str, torch.Tensor],
        global_params: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        start_gradient: Mapping[str, torch.Tensor] | None,
    ) -> HookOutput:
        new_c_i = client_control_update(self._c_i, self._c, global_params, params, float(sum(lrs)), self.option, start_gradient)
        new_c_i = truncate_to_rank(new_c_i, self._rank)  # a client of smaller rank has no control on the rest
        return HookOutput(
            extras={DELTA_C + n: new_c_i[n] - self._c_i[n] for n in new_c_i},
            memory={CLIENT_C + n: t for n, t in new_c_i.items()},
        )


@register_aggregator("scaffold")
class Scaffold(Aggregator):
    """Server control variate c, per-client c_i (client memory), and the server step."""

    needs_stable_parameter_space = True
    needs_individual_updates = "its server step needs each client's own control-variate change Delta c_i"
    uploads_extras = "each client's control-variate change Delta c_i (a function of its gradients)"

    class Params(AggregatorParams):
        option: Literal["I", "II"] = Field("I", description="control variate update of Algorithm 1, line 12 (II needs `federation.optimizer: sgd`)")
        server_lr: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="global step size eta_g")

    params: Params

    def __init__(self, params: AggregatorParams) -> None:
        super().__init__(params)
        self.num_clients: int | None = None
        self.c: TensorDict = {}
        self.c_clients = ClientStates()  # c_i per client: in memory, or on disk under RUN_DIR/clients/ (the simulation)

    def check_config(self, config: Any) -> None:
        if self.params.option == "II" and config.federation.optimizer != "sgd":
            raise FedlmError(
                "`aggregation.option: II` estimates c_i from the displacement (x - y) / (K eta_l), which is a mean "
                f"gradient only for SGD local steps, but `federation.optimizer` is {config.federation.optimizer!r}; "
                "use `aggregation.option: I` (gradient at the server model) or `federation.optimizer: sgd`"
            )

    def start(self, client_names: Sequence[str]) -> None:
        self.num_clients = len(client_names)

    def trainer_hooks(self) -> list[TrainerHook]:
        return [ScaffoldHook(self.params.option)]

    def client_context(self, client_id: str, round_num: int) -> ClientContext:
        extras = {SERVER_C + n: t for n, t in self.c.items()}
        memory = {CLIENT_C + n: t for n, t in self.c_clients.get(client_id, {}).items()}
        return ClientContext(client_id, round_num, extras, memory)

    def aggregate(self, global_params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        n = self.num_clients or len(updates)
        c = self.c or {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_params.items()}
        zeros = {k: torch.zeros_like(v) for k, v in c.items()}
        delta_cs = [{k: u.extras.get(DELTA_C + k, zeros[k]) for k in c} for u in updates]
        new_x, self.c = scaffold_server_step(
            global_params, [u.tensors for u in updates], [u.num_examples for u in updates], delta_cs, c, self.params.server_lr, n
        )
        for u in updates:
            if u.memory:
                self.c_clients[u.client_id] = {k.removeprefix(CLIENT_C): t for k, t in u.memory.items()}
        norm = float(sum(t.square().sum() for t in self.c.values())) ** 0.5
        return AggregationResult(new_x, {"num_updates": float(len(updates)), "control_variate_norm": norm})

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c), "c_clients": self.c_clients.checkpoint_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c = dict(state.get("c", {}))
        self.c_clients.load(state.get("c_clients", {}))
