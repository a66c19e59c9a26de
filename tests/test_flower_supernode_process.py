"""``fedlm flower supernode`` runs Flower's own SuperNode with its fixed waits shortened
(:mod:`fedlm.runtime.flower.supernode_process`): only the loop module's sleeps are capped, its object pulls start their
back-off short, and the command hands every other option to Flower. The whole path against real SuperNodes is
``test_flower_runtime.py::test_three_supernodes_end_with_the_simulation_adapter``."""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import flwr.supernode.start_client_internal as loop
import pytest
from flwr.supercore.inflatable import inflatable_utils

from fedlm.runtime.flower.launch import supernode_command
from fedlm.runtime.flower.supernode_process import CappedClock, shorten_waits


def test_the_capped_clock_waits_at_most_its_cap_and_is_time_otherwise() -> None:
    clock = CappedClock(0.05)
    started = time.monotonic()
    clock.sleep(3)  # Flower's idle poll
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    clock.sleep(0.02)  # shorter waits are kept
    assert 0.015 <= time.monotonic() - started
    assert clock.monotonic is time.monotonic and clock.time is time.time


def test_shorten_waits_patches_only_the_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    shorten_waits(0.1)
    assert isinstance(loop.time, CappedClock) and loop.time.cap_s == 0.1
    assert isinstance(loop.pull_objects, functools.partial) and loop.pull_objects.func is inflatable_utils.pull_objects
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
    assert time.sleep is not loop.time.sleep  # the process's own time module is untouched


def test_the_node_command_runs_the_short_poll_supernode_with_flowers_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cmd = supernode_command("127.0.0.1:9092", 2, 9300)
    assert cmd[:3] == [sys.executable, "-m", "fedlm.runtime.flower.supernode_process"]
    assert cmd[3:] == ["--superlink", "127.0.0.1:9092", "--port", "9300", "--node-config", "partition-id=2", "--isolation", "process", "--insecure"]
    help_text = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--superlink" in help_text and "--isolation" in help_text  # Flower's own parser
    bad = subprocess.run([*cmd[:3], "--idle-poll", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--idle-poll must be > 0 seconds" in bad.stderr
