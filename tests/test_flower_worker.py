"""fedlm's long-lived ClientApp process (``fedlm.runtime.flower.worker``, supervised by ``worker_process``) and what it
keeps between messages.

In process: a session kept from earlier messages trains a task exactly as a freshly built one (nothing leaks from
one message to the next: adapter weights, optimizer, RNG), a changed config builds a new session, and the ServerApp's
polling grid returns every reply. With processes (seconds, no SuperLink): the supervisor starts a new serving
process when the old one dies and everything exits with the SuperNode it serves. The whole path against real
SuperNodes is ``test_flower_runtime.py::test_three_supernodes_end_with_the_simulation_adapter`` (default suite).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_config
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from test_flower_runtime import flower_config

from fedlm.config.io import load_config
from fedlm.core.task import ClientContext, ClientTask, LocalPlan
from fedlm.runtime.flower import client_app, messages, node_cache
from fedlm.runtime.flower.local import descendants, wait_for
from fedlm.runtime.flower.node_train import train_on_node
from fedlm.runtime.flower.polling_grid import PollingGrid, polling, shorten_object_pulls

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def empty_cache() -> None:
    node_cache.clear()


def _task(config, client: str, round_num: int, seed: int, like: dict[str, torch.Tensor]) -> RecordDict:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in like.items()}  # a moved global adapter
    task = ClientTask(LocalPlan(round_num, [0.003, 0.002, 0.001], 4, seed), state, ClientContext(client, round_num))
    return messages.task_content(client, task, config)


def test_a_kept_session_trains_a_task_bit_for_bit_as_a_fresh_one(tmp_path: Path) -> None:
    """Dropout on (RNG), three AdamW steps (optimizer state): the same task on a session that trained another task
    before gives the update of a freshly built session, to the bit."""
    path = write_config(tmp_path / "c.yaml", flower_config(tmp_path / "run"))
    config = load_config(str(path))
    context = Context(1, 1, {"partition-id": 1, "fedlm-config": str(path)}, RecordDict(), {})
    client = client_app.client_names(config)[1]
    fresh_like = _fresh_state(config, client)
    task_a, task_b = _task(config, client, 2, 22, fresh_like), _task(config, client, 1, 11, fresh_like)
    fresh = train_on_node(task_a, context)
    assert fresh.update.metrics["session_reused"] == 0.0
    other = train_on_node(task_b, context)  # moves the model's adapter, the RNG, a new optimizer
    again = train_on_node(task_a, context)
    assert other.update.metrics["session_reused"] == 1.0 and again.update.metrics["session_reused"] == 1.0
    assert again.update.metrics["model_load_s"] == 0.0
    assert again.session is fresh.session  # one model in the process
    assert sorted(again.update.tensors) == sorted(fresh.update.tensors)
    assert all(torch.equal(again.update.tensors[k], fresh.update.tensors[k]) for k in fresh.update.tensors)
    assert again.update.metrics["loss"] == fresh.update.metrics["loss"]
    assert not all(torch.equal(other.update.tensors[k], fresh.update.tensors[k]) for k in fresh.update.tensors)


def _fresh_state(config, client: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from fedlm.runtime.flower.node_train import build_node_session  # noqa: PLC0415

    session, _ = node_cache.session(config, client, lambda: build_node_session(config, client))
    node_cache.clear()  # the test's first train message builds its own
    return {k: v.clone() for k, v in session.initial_state.items()}


def test_the_session_is_kept_per_config_and_client(tmp_path: Path) -> None:
    config = load_config(str(write_config(tmp_path / "c.yaml", flower_config(tmp_path / "run"))))
    changed = load_config(str(write_config(tmp_path / "d.yaml", flower_config(tmp_path / "run", federation={"lr": 0.01}))))
    built: list[str] = []

    def build(tag: str):  # type: ignore[no-untyped-def]
        return lambda: built.append(tag) or tag

    assert node_cache.session(config, "0", build("a")) == ("a", False)
    assert node_cache.session(config, "0", build("b")) == ("a", True)
    assert node_cache.session(changed, "0", build("c")) == ("c", False)  # the config changed: built anew
    assert node_cache.session(changed, "1", build("d")) == ("d", False)  # another client
    assert node_cache.session(config, "0", build("e")) == ("e", False)  # only the latest is kept
    assert built == ["a", "c", "d", "e"]
    assert node_cache.config_key(config) != node_cache.config_key(changed)
    names = [0]
    assert node_cache.client_names(config, lambda: [str(names.pop())]) == ["0"]
    assert node_cache.client_names(config, lambda: ["never"]) == ["0"]


class _SlowGrid(Grid):
    """Replies to each message on the ``delay``-th pull after it was pushed."""

    def __init__(self, delay: int) -> None:
        self.delay, self.pulls, self.pushed = delay, 0, []

    def set_run(self, run):  # type: ignore[no-untyped-def]  # noqa: D102
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # type: ignore[no-untyped-def]  # noqa: D102
        return [1, 2]

    def push_messages(self, messages):  # type: ignore[no-untyped-def]  # noqa: D102
        self.pushed = list(messages)
        return [f"id{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]  # noqa: D102
        self.pulls += 1
        if self.pulls < self.delay:
            return []
        out = []
        for mid in sorted(message_ids):
            reply = Message(RecordDict(), dst_node_id=1, message_type="query")
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError


def test_polling_grid_collects_every_reply_and_stops_at_the_timeout() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has them
    inner = _SlowGrid(delay=4)
    grid = PollingGrid(inner, poll_s=0.01)
    started = time.monotonic()
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2)], timeout=5))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1"] and inner.pulls == 4
    assert time.monotonic() - started < 1.0  # Flower's own grid waits 3 s between pulls
    late = _SlowGrid(delay=10**6)
    started = time.monotonic()
    assert list(PollingGrid(late, poll_s=0.01).send_and_receive([Message(RecordDict(), dst_node_id=1, message_type="query")], timeout=0.2)) == []
    assert 0.2 <= time.monotonic() - started < 2.0
    assert list(grid.get_node_ids()) == [1, 2]
    assert polling(inner) is inner  # only Flower's deployment (HTTP) grid is wrapped


def test_the_servers_object_pulls_start_their_back_off_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply's message reaches the SuperLink before its objects; Flower's grid then waits 1 s, 2 s ... between
    tries. Only the grid module's pull is replaced, with Flower's own function (a 0.05 s first wait, 1 s at most)."""
    import functools  # noqa: PLC0415

    from flwr.supercore.inflatable import inflatable_utils  # noqa: PLC0415
    from flwr.superlink.grid import http_grid  # noqa: PLC0415

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    shorten_object_pulls()
    assert isinstance(http_grid.pull_objects, functools.partial) and http_grid.pull_objects.func is inflatable_utils.pull_objects
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
    assert (inflatable_utils.pull_objects.__kwdefaults__ or {}).get("initial_backoff") == 1  # Flower's own function is untouched


def _children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]


def test_the_worker_restarts_its_serving_process_and_exits_with_the_supernode(tmp_path: Path) -> None:
    """A stand-in SuperNode (``sleep``) as parent and a bare TCP listener as its Runtime API (the serving process
    keeps retrying its requests). No serving process before the API listens; killing the serving process starts
    another; killing the parent ends both."""
    node = subprocess.Popen(["sleep", "600"])
    api = socket.socket()
    api.bind(("127.0.0.1", 0))
    port = api.getsockname()[1]
    cmd = [sys.executable, "-m", "fedlm.runtime.flower.worker_process", "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(node.pid)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3)
        assert worker.poll() is None and _children(worker.pid) == []  # waits for the SuperNode's API
        api.listen()
        wait_for(lambda: len(_children(worker.pid)) == 1, 60, "the serving process")
        first = _children(worker.pid)[0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _children(worker.pid) not in ([], [first]), 60, "a new serving process")
        second = _children(worker.pid)[0]
        assert second != first
        node.kill()
        node.wait()
        worker.wait(timeout=60)
        wait_for(lambda: not Path(f"/proc/{second}").exists() or "Z" in Path(f"/proc/{second}/stat").read_text().rsplit(")", 1)[1][:3], 30, "exit")
    finally:
        for pid in [*descendants(worker.pid), worker.pid, node.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait()
        node.wait()
        api.close()
