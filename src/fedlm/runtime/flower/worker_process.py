"""The process that ``fedlm flower supernode`` starts beside its SuperNode: it keeps one long-lived ClientApp process
(:mod:`fedlm.runtime.flower.worker`) serving the node.

This supervisor imports nothing heavy (standard library only): it waits until the SuperNode's Runtime API accepts
connections, so that the ClientApp's imports and model load do not slow the SuperNode's own start and registration
with the SuperLink, then starts the serving process and starts a new one whenever it dies while the SuperNode lives
(its task fails like a crashed ``flwr-clientapp``). It exits, and ends the serving process, when the SuperNode exits.

    python -m fedlm.runtime.flower.worker_process --runtime-api-address 127.0.0.1:PORT --parent-pid PID
        [--config NODE.yaml --partition-id K] [--poll 0.25]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MODULE = "fedlm.runtime.flower.worker_process"


def parent_alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def listening(address: str) -> bool:
    """Whether ``HOST:PORT`` accepts a TCP connection now."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def supervise(argv: list[str], address: str, parent_pid: int, restart_s: float = 1.0) -> int:
    """Once ``address`` listens, run the serving process (``argv`` with ``--serve``) and start it again whenever it
    dies while ``parent_pid`` lives; the exit code of the last one."""
    while parent_alive(parent_pid) and not listening(address):
        time.sleep(0.5)
    code = 0
    while parent_alive(parent_pid):
        proc = subprocess.Popen([sys.executable, "-m", MODULE, *argv, "--serve", "--parent-pid", str(os.getpid())])
        try:
            while proc.poll() is None:
                if not parent_alive(parent_pid):
                    proc.terminate()
                    proc.wait(timeout=30)
                    return 0
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            return 0
        code = proc.returncode
        if parent_alive(parent_pid):
            print(f"fedlm worker: the ClientApp process exited with code {code}; starting a new one", file=sys.stderr, flush=True)
            time.sleep(restart_s)
    return code


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fedlm's long-lived ClientApp process beside a SuperNode (--isolation process)")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --port)")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits (default: the parent)")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between asking the SuperNode for a task")
    p.add_argument("--config", type=Path, help="the node's fedlm config: build its session before the first message")
    p.add_argument("--partition-id", type=int, help="the client the node serves (with --config)")
    p.add_argument("--serve", action="store_true", help="serve in this process (default: supervise a serving child)")
    args = p.parse_args(argv)
    if args.serve:
        from fedlm.runtime.flower.worker import serve  # noqa: PLC0415 - start-up speed: only the serving process imports Flower and torch

        try:
            serve(args.runtime_api_address, args.poll, args.parent_pid, args.config, args.partition_id)
        except KeyboardInterrupt:  # the parent exited (Flower's monitor sends SIGINT) or Ctrl-C
            sys.exit(0)
        return
    forwarded = ["--runtime-api-address", args.runtime_api_address, "--poll", str(args.poll)]
    if args.config is not None and args.partition_id is not None:
        forwarded += ["--config", str(args.config), "--partition-id", str(args.partition_id)]
    sys.exit(supervise(forwarded, args.runtime_api_address, args.parent_pid if args.parent_pid is not None else os.getppid()))


if __name__ == "__main__":
    main()
