"""A whole Flower federation on this machine (127.0.0.1): one SuperLink and N SuperNodes as subprocesses.

Used by the tests and ``benchmarks/flower.py``; also a template for a real set-up (the same command lines, with
real addresses). Every process it starts is stopped by PID in :meth:`LocalFederation.stop` (a context manager
exit), together with the processes started under it (SuperExec, ServerApp, fedlm's long-lived ClientApp process or
Flower's per-message ones), found in ``/proc``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedlm.runtime.flower.launch import Tls, with_scripts_on_path, write_flwr_home


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, recursively), read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc``, every process below it (by PID) and its process group (``proc`` was started as a
    session leader, so the group id is its PID and holds children orphaned by a crash), and reap ``proc``."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class LocalFederation:
    """A SuperLink and one SuperNode per partition id, on free ports of 127.0.0.1, logs under ``workdir``."""

    workdir: Path
    config_path: Path
    partition_ids: Sequence[int]
    tls: Tls | None = None
    node_auth: bool = False
    node_keys: dict[int, Path] = field(default_factory=dict)  # partition id -> private key (node authentication)
    node_threads: int | None = None  # CPU threads of each SuperNode's ClientApps (nodes sharing one machine's cores)
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)  # partition id -> extra environment (tests' faults)
    process_per_message: bool = False  # Flower's default ClientApp process per message instead of fedlm's long-lived one
    state_dirs: dict[int, Path] = field(default_factory=dict)  # partition id -> the node's --state-dir (default: workdir/state<K>)
    port: int = field(default_factory=free_port)
    superlink: subprocess.Popen[bytes] | None = None
    nodes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: its own FLWR_HOME (Flower's app cache and connection file)."""
        return with_scripts_on_path({**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"), "TOKENIZERS_PARALLELISM": "false"})

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.workdir, start_new_session=True)

    def fedlm(self, *args: str) -> list[str]:
        """The ``fedlm`` command line of this Python environment."""
        return [sys.executable, "-m", "fedlm.cli", *args]

    def start_superlink(self) -> None:
        """Start (or restart, on the same port) the SuperLink."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_flwr_home(self.workdir / "flwr-home", self.address, self.tls)
        args = ["flower", "superlink", "--port", str(self.port), "--database", str(self.workdir / "superlink.db")]
        if self.tls is not None:
            args += ["--ca-cert", str(self.tls.ca_cert), "--cert", str(self.tls.server_cert), "--key", str(self.tls.server_key)]
        if self.node_auth:
            args.append("--node-auth")
        self.superlink = self._start("superlink", self.fedlm(*args))

    def start_node(self, partition_id: int, config_path: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a SuperNode serving ``partition_id`` (its own config file if given)."""
        args = [
            "flower",
            "supernode",
            str(config_path or self.config_path),
            "--partition-id",
            str(partition_id),
            "--superlink",
            self.address,
            "--port",
            str(free_port()),
        ]
        if self.tls is not None:
            args += ["--ca-cert", str(self.tls.ca_cert)]
        if partition_id in self.node_keys:
            args += ["--private-key", str(self.node_keys[partition_id])]
        if self.process_per_message:
            args.append("--process-per-message")
        args += ["--state-dir", str(self.state_dirs.get(partition_id, self.workdir / f"state{partition_id}"))]
        env = self.env
        if self.node_threads is not None:  # inherited by the node's ClientApp process(es)
            env = {**env, "OMP_NUM_THREADS": str(self.node_threads), "MKL_NUM_THREADS": str(self.node_threads)}
        env = {**env, **self.node_env.get(partition_id, {})}
        proc = self._start(f"supernode{partition_id}-{len(self.nodes)}", self.fedlm(*args), env)
        self.nodes[len(self.nodes)] = proc
        return proc

    def start(self) -> LocalFederation:
        """The SuperLink, then one SuperNode per partition id."""
        self.start_superlink()
        for pid in self.partition_ids:
            self.start_node(pid)
        return self

    def run(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``fedlm flower run CONFIG`` on this SuperLink (extra ``args``, e.g. ``--resume``); not waited for."""
        extra = ["--ca-cert", str(self.tls.ca_cert)] if self.tls is not None else []
        proc = self._start(f"run{len(self.runs)}", self.fedlm("flower", "run", str(self.config_path), "--superlink", self.address, *extra, *args))
        self.runs.append(proc)
        return proc

    def kill_superlink(self) -> None:
        """Kill the SuperLink and everything under it (its SuperExec and the ServerApp)."""
        if self.superlink is not None:
            kill_tree(self.superlink)
            self.superlink = None

    def stop(self) -> None:
        """Stop every process this federation started, by PID (and the Flower processes below them)."""
        for proc in [*self.runs, *self.nodes.values(), *([self.superlink] if self.superlink else [])]:
            kill_tree(proc)
        self.superlink = None

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true; raise TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(poll_s)
