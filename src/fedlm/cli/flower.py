"""``fedlm flower ...``: run a federation on Flower's Deployment Engine (SuperLink + SuperNodes), no Docker.

    fedlm flower superlink [--host 0.0.0.0] [--port 9093]                      # on the server machine
    fedlm flower supernode CONFIG.yaml --partition-id K --superlink HOST:9093  # on each client machine
        [--state-dir DIR]                                                      # personalization: the client's state
        [--data /local/train.jsonl]                                            # partition.method node_local
    fedlm flower run CONFIG.yaml --superlink HOST:9093 [--resume]             # from anywhere: starts the run

``superlink`` and ``supernode`` replace themselves with Flower's own ``flower-superlink`` / ``flower-supernode`` (the latter with a
short idle poll, :mod:`fedlm.runtime.flower.supernode_process`)
(same PID) after checking their input; ``supernode`` first starts fedlm's long-lived ClientApp process beside it
(:mod:`fedlm.runtime.flower.worker_process`, ``--isolation process``; ``--process-per-message``: Flower's default); ``run`` writes the app bundle and calls ``flwr run``. Registered in
:mod:`fedlm.cli`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedlm.cli.guard import guarded
from fedlm.core.errors import FedlmError

flower_app = typer.Typer(no_args_is_help=True, help="Run on Flower's Deployment Engine: SuperLink, SuperNodes, flwr run.")

ConfigArg = Annotated[Path, typer.Argument(help="experiment YAML with `federation.runtime: flower`")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value (repeatable)")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]
CaOpt = Annotated[Path | None, typer.Option("--ca-cert", help="CA certificate (TLS); without it the connection is insecure")]


def _exec(cmd: list[str]) -> None:
    """Replace this process with ``cmd`` (the caller's PID stays the Flower process's PID), this environment's
    scripts first on ``PATH`` for the processes Flower starts."""
    from fedlm.runtime.flower.launch import with_scripts_on_path

    env = with_scripts_on_path(dict(os.environ))
    if os.path.isabs(cmd[0]):
        os.execve(cmd[0], cmd, env)
    os.execvpe(cmd[0], cmd, env)


def _tls(ca_cert: Path | None, cert: Path | None = None, key: Path | None = None):  # type: ignore[no-untyped-def]
    from fedlm.runtime.flower.launch import Tls

    for path in (ca_cert, cert, key):
        if path is not None and not path.is_file():
            raise FedlmError(f"TLS file {str(path)!r} does not exist; `fedlm flower certs DIR` creates a test set")
    return Tls(ca_cert, cert, key) if ca_cert is not None else None


@flower_app.command()
def superlink(
    host: Annotated[str, typer.Option(help="address to listen on: 0.0.0.0 for other machines")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the Fleet, Control and Runtime HTTP API port")] = 9093,
    ca_cert: CaOpt = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="the SuperLink's TLS certificate")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="the SuperLink's TLS private key")] = None,
    node_auth: Annotated[bool, typer.Option("--node-auth", help="accept only SuperNodes whose public key is registered")] = False,
    database: Annotated[
        Path | None, typer.Option("--database", help="SQLite file of the SuperLink's state: a restarted SuperLink keeps its SuperNodes")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Start a Flower SuperLink (insecure unless --ca-cert/--cert/--key are given)."""

    def action() -> None:
        from fedlm.runtime.flower.launch import superlink_command

        _exec(superlink_command(host, port, _tls(ca_cert, cert, key), node_auth, database))

    guarded(debug, action)


@flower_app.command()
def supernode(
    config: ConfigArg,
    partition_id: Annotated[int, typer.Option("--partition-id", help="the client this node serves (0-based, partition order)")],
    superlink_address: Annotated[str, typer.Option("--superlink", help="the SuperLink's HOST:PORT")] = "127.0.0.1:9093",
    port: Annotated[int, typer.Option(help="this node's local ClientApp API port (one per node on a machine)")] = 9094,
    ca_cert: CaOpt = None,
    private_key: Annotated[Path | None, typer.Option("--private-key", help="this node's private key (node authentication)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="partition.method node_local: this node's own training data (sets data.train)")] = None,
    process_per_message: Annotated[
        bool,
        typer.Option(
            "--process-per-message",
            help="Flower's default: a fresh ClientApp process (imports, model load) for every message, instead of one long-lived process",
        ),
    ] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="where this node keeps its client's personal state (personalization.method); default ./fedlm-node-state"),
    ] = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Start a Flower SuperNode serving one client, with fedlm's long-lived ClientApp process beside it (the model,
    tokenizer and data load once, not once per message); a partition id outside the federation is refused here, and
    with ``personalization.method`` a state directory that cannot be written."""
    if data is not None:
        set_ = [*(set_ or []), f"data.train={data.resolve()}"]

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.runtime.flower.client_app import check_local_data, client_names, client_of
        from fedlm.runtime.flower.launch import supernode_command

        cfg = load_config(config, set_ or [])
        client = client_of(partition_id, client_names(cfg))
        if cfg.partition.method == "node_local":
            count = check_local_data(cfg)
            typer.echo(f"supernode: client {client} trains on its own {count} records of {cfg.data.train}", err=True)
        from fedlm.runtime.flower.state_dir import DEFAULT_STATE_DIR, check_state_dir

        node_state = (state_dir or DEFAULT_STATE_DIR).resolve()
        if cfg.personalization.method is not None:  # the client's personal state lives on this node
            check_state_dir(node_state)
            typer.echo(f"supernode: client {client} keeps its personal state ({cfg.personalization.method}) in {node_state}", err=True)
        if private_key is not None and not private_key.is_file():
            raise FedlmError(f"--private-key {str(private_key)!r} does not exist")
        local = config
        if set_:
            local = Path(tempfile.mkdtemp(prefix="fedlm-node-")) / "config.yaml"
            from fedlm.config.io import save_config

            save_config(cfg, local)
        typer.echo(f"supernode: partition-id {partition_id} serves client {client}", err=True)
        if not process_per_message:  # beside the SuperNode, which takes this PID below; it exits with it
            from fedlm.runtime.flower.launch import worker_command

            subprocess.Popen(worker_command(port, os.getpid(), local, partition_id))  # noqa: S603 - our own interpreter and module
        _exec(supernode_command(superlink_address, partition_id, port, local, _tls(ca_cert), private_key, not process_per_message, node_state))

    guarded(debug, action)


@flower_app.command()
def bundle(
    config: ConfigArg,
    app_dir: Annotated[Path, typer.Argument(help="the Flower app directory to write")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue output_dir from its last checkpoint")] = False,
    round_timeout: Annotated[float, typer.Option("--round-timeout", help="seconds to wait for a round's replies")] = 600.0,
    debug: DebugOpt = False,
) -> None:
    """Write the Flower app directory (pyproject.toml with the config embedded) for `flwr run APP_DIR`."""

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.runtime.flower.launch import Deployment, write_bundle

        cfg = load_config(config, set_ or [])
        typer.echo(str(write_bundle(cfg, app_dir, Deployment(resume=resume, round_timeout_s=round_timeout))))

    guarded(debug, action)


@flower_app.command("run")
def run_(
    config: ConfigArg,
    superlink_address: Annotated[str, typer.Option("--superlink", help="the SuperLink's HOST:PORT")] = "127.0.0.1:9093",
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue output_dir from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output_dir")] = False,
    round_timeout: Annotated[float, typer.Option("--round-timeout", help="seconds to wait for a round's replies")] = 600.0,
    min_nodes: Annotated[int, typer.Option("--min-nodes", help="client nodes to wait for before round 1 (0: every client)")] = 0,
    wait_for_nodes: Annotated[float, typer.Option("--wait-for-nodes", help="seconds to wait for them")] = 120.0,
    ca_cert: CaOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Start the federation of CONFIG on a running SuperLink and stream its log until it ends."""

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.runtime.flower.launch import Deployment, run_command, write_bundle, write_flwr_home

        cfg = load_config(config, set_ or [])
        if cfg.federation.runtime != "flower":
            raise FedlmError("`fedlm flower run` needs `federation.runtime: flower` (add --set federation.runtime=flower)")
        work = Path(tempfile.mkdtemp(prefix="fedlm-flower-"))
        deployment = Deployment(resume, overwrite, round_timeout, min_nodes, wait_for_nodes)
        app_dir = write_bundle(cfg, work / "app", deployment)
        home = write_flwr_home(work / "flwr-home", superlink_address, _tls(ca_cert))
        from fedlm.runtime.flower.launch import with_scripts_on_path

        code = subprocess.call(run_command(app_dir), env=with_scripts_on_path({**os.environ, "FLWR_HOME": str(home)}))
        if code != 0:
            raise FedlmError(f"`flwr run` exited with code {code}; see the SuperLink's log")

    guarded(debug, action)


@flower_app.command()
def certs(
    directory: Annotated[Path, typer.Argument(help="where to write ca.crt, server.crt/.key and node<K>/.pub")],
    nodes: Annotated[int, typer.Option("--nodes", min=0, help="how many SuperNode key pairs")] = 3,
    host: Annotated[list[str] | None, typer.Option("--host", help="the SuperLink's address on the network (repeatable)")] = None,
    debug: DebugOpt = False,
) -> None:
    """Create test credentials: a CA, the SuperLink's TLS certificate and SuperNode authentication keys."""

    def action() -> None:
        from fedlm.runtime.flower.certs import create_credentials

        made = create_credentials(directory, nodes, host or [])
        typer.echo(f"CA {made.ca_cert}; SuperLink {made.server_cert} + {made.server_key}; nodes {', '.join(map(str, made.node_keys))} (+ .pub)")

    guarded(debug, action)


@flower_app.command()
def register(
    public_key: Annotated[Path, typer.Argument(help="a SuperNode's public key (node<K>.pub)")],
    superlink_address: Annotated[str, typer.Option("--superlink", help="the SuperLink's HOST:PORT")] = "127.0.0.1:9093",
    ca_cert: CaOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Register a SuperNode's public key with a SuperLink started with --node-auth (`flwr supernode register`)."""

    def action() -> None:
        from fedlm.runtime.flower.launch import (
            CONNECTION,
            _bin,
            write_flwr_home,
        )

        if not public_key.is_file():
            raise FedlmError(f"public key {str(public_key)!r} does not exist; `fedlm flower certs DIR` writes node<K>.pub")
        home = write_flwr_home(Path(tempfile.mkdtemp(prefix="fedlm-flwr-")), superlink_address, _tls(ca_cert))
        code = subprocess.call([_bin("flwr"), "supernode", "register", str(public_key), CONNECTION], env={**os.environ, "FLWR_HOME": str(home)})
        if code != 0:
            raise FedlmError(f"`flwr supernode register` exited with code {code}")

    guarded(debug, action)
