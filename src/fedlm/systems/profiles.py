"""Device profiles (a client's compute speed and bandwidth) and availability traces, seeded or read from CSV.

A profile CSV has the header ``client,steps_per_s,uplink_mbps,downlink_mbps`` and one row per client; an availability
CSV has the header ``client,start_s,end_s`` and one row per window in which the client is online (simulated
seconds; ``inf`` allowed as an end). A bad file is refused naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedlm.config.schema.systems import SystemsConfig
from fedlm.core.errors import FedlmError
from fedlm.core.seeding import derive_seed

PROFILE_FIELDS = ("client", "steps_per_s", "uplink_mbps", "downlink_mbps")
AVAILABILITY_FIELDS = ("client", "start_s", "end_s")


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: optimizer steps per second and bandwidths in Mbit/s."""

    steps_per_s: float
    uplink_mbps: float
    downlink_mbps: float


def seeded_profiles(config: SystemsConfig, client_names: Sequence[str], seed: int) -> dict[str, DeviceProfile]:
    """Each client's speed ``steps_per_s * exp(speed_sigma * z)`` (z standard normal, seeded per client), divided by
    ``slow_factor`` for ``slow_clients`` clients drawn with the seed; every client has the configured bandwidths."""
    slow = set(random.Random(derive_seed(seed, "systems-slow")).sample(sorted(client_names), min(config.slow_clients, len(client_names))))
    profiles = {}
    for client in client_names:
        z = random.Random(derive_seed(seed, "systems-speed", client)).gauss(0.0, 1.0)
        speed = config.steps_per_s * math.exp(config.speed_sigma * z) / (config.slow_factor if client in slow else 1.0)
        profiles[client] = DeviceProfile(speed, config.uplink_mbps, config.downlink_mbps)
    return profiles


def _rows(path: Path, fields: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """The data rows of CSV ``path`` (row numbers counting the header as row 1), after checking the header."""
    if not path.is_file():
        raise FedlmError(f"`systems.{what}`: {path} is not a file")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header != list(fields):
            raise FedlmError(f"`systems.{what}` {path} row 1: the header must be {','.join(fields)}, got {','.join(header) or 'nothing'}")
        rows = []
        for number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(fields):
                raise FedlmError(f"`systems.{what}` {path} row {number}: expected {len(fields)} fields ({','.join(fields)}), got {len(row)}")
            rows.append((number, {name: cell.strip() for name, cell in zip(fields, row, strict=True)}))
    return rows


def _number(path: Path, number: int, row: Mapping[str, str], name: str, what: str, positive: bool) -> float:
    """Field ``name`` of a row as a float: finite (or +inf for an end), > 0 when ``positive``, else >= 0."""
    text = row[name]
    try:
        value = float(text)
    except ValueError:
        raise FedlmError(f"`systems.{what}` {path} row {number}, field {name}: cannot read {text!r} as a number") from None
    if math.isnan(value) or (math.isinf(value) and name != "end_s"):
        raise FedlmError(f"`systems.{what}` {path} row {number}, field {name}: must be a finite number, got {text!r}")
    if value < 0 or (positive and value == 0):
        raise FedlmError(f"`systems.{what}` {path} row {number}, field {name}: must be {'> 0' if positive else '>= 0'}, got {text}")
    return value


def _check_clients(path: Path, seen: Mapping[str, int], client_names: Sequence[str] | None, what: str) -> None:
    """Every federation client has a row, and every row names a federation client."""
    if client_names is None:
        return
    missing = [c for c in client_names if c not in seen]
    if missing:
        raise FedlmError(f"`systems.{what}` {path}: no row for client {missing[0]!r} (field client); give one for every client")
    unknown = [(c, n) for c, n in seen.items() if c not in set(client_names)]
    if unknown:
        client, number = unknown[0]
        raise FedlmError(f"`systems.{what}` {path} row {number}, field client: {client!r} is not a client of the federation")


def read_profiles(path: Path, client_names: Sequence[str] | None = None) -> dict[str, DeviceProfile]:
    """The profiles of CSV ``path``; with ``client_names``, one row per client is required (and no other)."""
    profiles: dict[str, DeviceProfile] = {}
    seen: dict[str, int] = {}
    for number, row in _rows(path, PROFILE_FIELDS, "profiles"):
        client = row["client"]
        if not client:
            raise FedlmError(f"`systems.profiles` {path} row {number}, field client: empty")
        if client in seen:
            raise FedlmError(f"`systems.profiles` {path} row {number}, field client: {client!r} already has row {seen[client]}")
        seen[client] = number
        speed, up, down = (_number(path, number, row, name, "profiles", positive=True) for name in PROFILE_FIELDS[1:])
        profiles[client] = DeviceProfile(speed, up, down)
    _check_clients(path, seen, client_names, "profiles")
    return profiles


class Availability(Protocol):
    """When each client is online, in simulated seconds."""

    def online(self, client: str, t: float) -> bool:
        """Whether ``client`` is online at time ``t``."""
        ...

    def next_online(self, clients: Sequence[str], t: float) -> float | None:
        """The earliest time >= ``t`` at which one of ``clients`` is online (None: never)."""
        ...


class AlwaysOnline:
    """Every client, all the time."""

    def online(self, client: str, t: float) -> bool:
        return True

    def next_online(self, clients: Sequence[str], t: float) -> float | None:
        return t if clients else None


@dataclass(frozen=True)
class SeededAvailability:
    """Time cut in slots of ``slot_s``; a client is online in a slot with probability ``fraction``, drawn from
    (seed, client, slot), so the trace is a pure function of the seed."""

    fraction: float
    slot_s: float
    seed: int
    horizon_slots: int = 100_000  # how far next_online looks ahead

    def online(self, client: str, t: float) -> bool:
        slot = math.floor(t / self.slot_s)
        return random.Random(derive_seed(self.seed, "systems-online", client, slot)).random() < self.fraction

    def next_online(self, clients: Sequence[str], t: float) -> float | None:
        if any(self.online(c, t) for c in clients):
            return t
        first = math.floor(t / self.slot_s) + 1
        for slot in range(first, first + self.horizon_slots):
            if any(self.online(c, slot * self.slot_s) for c in clients):
                return slot * self.slot_s
        return None


@dataclass(frozen=True)
class WindowAvailability:
    """Online windows ``[start_s, end_s)`` per client (from an availability CSV)."""

    windows: Mapping[str, Sequence[tuple[float, float]]]

    def online(self, client: str, t: float) -> bool:
        return any(start <= t < end for start, end in self.windows.get(client, ()))

    def next_online(self, clients: Sequence[str], t: float) -> float | None:
        starts = [max(start, t) for c in clients for start, end in self.windows.get(c, ()) if end > t and end > start]
        return min(starts) if starts else None


def read_availability(path: Path, client_names: Sequence[str] | None = None) -> WindowAvailability:
    """The online windows of CSV ``path``; with ``client_names``, every client needs at least one row."""
    windows: dict[str, list[tuple[float, float]]] = {}
    seen: dict[str, int] = {}
    for number, row in _rows(path, AVAILABILITY_FIELDS, "availability"):
        client = row["client"]
        if not client:
            raise FedlmError(f"`systems.availability` {path} row {number}, field client: empty")
        start = _number(path, number, row, "start_s", "availability", positive=False)
        end = _number(path, number, row, "end_s", "availability", positive=False)
        if end < start:
            raise FedlmError(f"`systems.availability` {path} row {number}, field end_s: {end:g} is before start_s {start:g}")
        seen.setdefault(client, number)
        windows.setdefault(client, []).append((start, end))
    _check_clients(path, seen, client_names, "availability")
    return WindowAvailability(windows)


def build_profiles(config: SystemsConfig, client_names: Sequence[str], seed: int) -> dict[str, DeviceProfile]:
    """The run's profiles: seeded, or read from the ``profiles`` CSV."""
    if config.profiles == "seeded":
        return seeded_profiles(config, client_names, seed)
    return read_profiles(Path(config.profiles), client_names)


def build_availability(config: SystemsConfig, client_names: Sequence[str], seed: int) -> Availability:
    """The run's availability: the CSV trace, a seeded trace, or always online."""
    if config.availability is not None:
        return read_availability(Path(config.availability), client_names)
    if config.available_fraction < 1.0:
        return SeededAvailability(config.available_fraction, config.availability_slot_s, seed)
    return AlwaysOnline()
