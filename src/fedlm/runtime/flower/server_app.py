"""fedlm's Flower ServerApp: the simulation's server loop (sampling, aggregation and its state, evaluation,
checkpoints, metrics) with :class:`FlowerRuntime` in place of the in-process clients.

The run config (``[tool.flwr.app.config]`` of the bundle, see :mod:`fedlm.runtime.flower.launch`) carries the fedlm
config as YAML text (``fedlm-config``) and the deployment settings: ``resume`` (continue ``output_dir`` from its
last checkpoint, as ``fedlm run --resume``), ``overwrite``, ``round-timeout`` (seconds to wait for a round's
replies), ``min-nodes`` and ``wait-for-nodes`` (how many client nodes to wait for, and how long, before round 1).
"""

from __future__ import annotations

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlm.config.io import validate_config
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.runtime.flower.polling_grid import polling
from fedlm.runtime.flower.runtime import FlowerRuntime

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation of the bundled config over the SuperNodes of this run."""
    from fedlm.experiment import build_session, run_federated  # noqa: PLC0415
    from fedlm.reporting.progress import RunConsole  # noqa: PLC0415
    from fedlm.reporting.run_dir import prepare_run_dir  # noqa: PLC0415

    rc = context.run_config
    config = validate_config(yaml.safe_load(str(rc["fedlm-config"])))
    resume, overwrite = bool(rc.get("resume", False)), bool(rc.get("overwrite", False))
    run_dir = prepare_run_dir(config.output_dir, resume=resume, overwrite=overwrite)
    console = RunConsole()
    session = build_session(config, console)
    run_dir.create()
    console.attach(run_dir.log)
    names = session.data.client_names
    min_nodes = int(rc.get("min-nodes", 0)) or len(names)
    runtime = FlowerRuntime(
        polling(grid),
        config,
        names,
        session.initial_state,
        MetricsLog(run_dir.metrics),
        console,
        round_timeout_s=float(rc.get("round-timeout", 600.0)),
        min_nodes=min_nodes,
        wait_for_nodes_s=float(rc.get("wait-for-nodes", 120.0)),
    )
    run_federated(session, run_dir, resume, console, runtime)
    console.print(f"[green]done[/green]: {run_dir.root} (report.md, metrics.jsonl, adapter/)")
