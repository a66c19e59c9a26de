"""Our SecAgg+ against a reference no one here wrote: Flower's own ``SecAggPlusWorkflow`` with ``secaggplus_mod``
(flwr 1.41), driven over an in-memory Grid (:mod:`flower_grid`), on the same integer inputs.

Where the parameters match the sums must be equal. Flower quantises floats stochastically; with
``clipping_range = c`` and ``quantization_range = 2c`` its quantiser is the identity shift x -> x + c, so integer
inputs in [-c, c] are encoded exactly (no rounding), as our codes x + c are; with every weight at ``max_weight`` its
weighted mean times n is the plain sum. Ours runs both in-process (:func:`secure_sum`) and over Flower messages
between our node handlers (:func:`test_secagg_flower._flower_sum`).
"""

from __future__ import annotations

import numpy as np
import pytest
from flower_grid import InMemoryGrid
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from test_secagg_flower import _flower_sum

from fedlm.privacy.secagg.simulate import secure_sum

C = 2**16  # clipping range c: inputs are integers in [-c, c]
N, LENGTH, MAX_WEIGHT = 5, 101, 10.0


def _inputs() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(11)
    return {u: rng.integers(-C, C + 1, LENGTH).astype(np.int64) for u in range(1, N + 1)}


def _flower_reference(inputs: dict[int, np.ndarray], threshold: int) -> np.ndarray:
    """Flower's SecAgg+ round (their workflow and mod, unchanged) over ``inputs``; returns n x its mean."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        x = inputs[context.node_id].astype(np.float64)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([x]), int(MAX_WEIGHT), {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    grid = InMemoryGrid(app, {u: {} for u in inputs}, {})
    manager = SimpleClientManager()
    for u in inputs:
        manager.register(GridClientProxy(node_id=u, grid=grid, run_id=1))
    start = ndarrays_to_parameters([np.zeros(LENGTH)])
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=N, min_available_clients=N, fraction_evaluate=0.0, initial_parameters=start)
    context = LegacyContext(Context(1, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1), strategy, manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(start, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=N,
        reconstruction_threshold=threshold,
        max_weight=MAX_WEIGHT,
        clipping_range=float(C),
        quantization_range=2 * C,
        modulus_range=2**32,
    )
    workflow(grid, context)
    result = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    (mean,) = parameters_to_ndarrays(result)
    return np.round(mean * N).astype(np.int64)


@pytest.mark.parametrize("threshold", [3, 4])
def test_our_secagg_plus_and_flowers_give_the_same_sum_on_the_same_inputs(threshold: int) -> None:
    inputs = _inputs()
    reference = _flower_reference(inputs, threshold)
    plain = np.sum(list(inputs.values()), axis=0)
    assert np.array_equal(reference, plain)  # Flower's protocol is exact here, so the comparison can fail only on ours
    codes = {u: (x + C).astype(np.uint32) for u, x in inputs.items()}  # our codes: x + c, as Flower's quantiser here
    ours = secure_sum(codes, round_num=1, threshold=threshold, neighbours=None, graph_seed=3)
    assert np.array_equal(ours.total.astype(np.int64) - N * C, reference)
    over_flower, _, _ = _flower_sum(codes, {}, threshold)
    assert np.array_equal(over_flower.astype(np.int64) - N * C, reference)
