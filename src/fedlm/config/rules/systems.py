"""Rules on the ``systems`` section: the simulated clock, round deadlines and FedBuff run in the in-process
simulation; FedBuff refuses what assumes a synchronous round; device-profile and availability files are readable
and cover the federation's clients."""

from __future__ import annotations

from pathlib import Path

from fedlm.config.rules.setting import SECAGG, Setting
from fedlm.core.errors import FedlmError
from fedlm.systems.profiles import read_availability, read_profiles


def systems_in_the_simulation(s: Setting) -> None:
    """The simulated clock (device profiles, availability, deadlines) decides each client's work in the in-process
    simulation; over Flower the clients run on real devices with their own clocks, so only FedBuff's asynchronous
    server runs there (arrivals in wall-clock order), and every simulated-device setting is refused."""
    c = s.config
    if c.federation.round_deadline_s is not None and c.systems is None:
        raise FedlmError(
            "`federation.round_deadline_s` needs a `systems` section: the deadline is in simulated seconds, "
            "which need each client's device profile (e.g. `systems: {profiles: seeded}`)"
        )
    if c.systems is None or c.federation.runtime == "simulation":
        return
    runtime = f"`federation.runtime: {c.federation.runtime}`"
    if c.systems.mode != "fedbuff":
        raise FedlmError(
            f"`systems.mode: sync` (the simulated clock and deadlines) is built for `federation.runtime: simulation`, not {runtime}, "
            "where clients run on real devices (`--round-timeout` bounds a round's wall time); remove `systems` or set `systems.mode: fedbuff`"
        )
    defaults = type(c.systems)().model_dump()  # a config written out again carries every key: compare values
    simulated = sorted(k for k, v in c.systems.model_dump().items() if k not in ("mode", "fedbuff") and v != defaults[k])
    if simulated or c.federation.round_deadline_s is not None:
        keys = ", ".join(f"`systems.{k}`" for k in simulated) or "`federation.round_deadline_s`"
        raise FedlmError(
            f"{keys} describe simulated devices; over {runtime} the devices are real: remove them (FedBuff keeps `systems.mode` and `systems.fedbuff`)"
        )


def systems_files_readable(s: Setting) -> None:
    """A device-profile or availability CSV must parse: the header, then rows with a client and valid numbers."""
    systems = s.config.systems
    if systems is None:
        return
    if systems.profiles != "seeded":
        read_profiles(Path(systems.profiles))
    if systems.availability is not None:
        read_availability(Path(systems.availability))


def systems_files_cover_clients(s: Setting) -> None:
    """Every client of the federation needs a device profile (and availability windows), and every row a client."""
    systems = s.config.systems
    if systems is None:
        return
    if systems.profiles != "seeded":
        read_profiles(Path(systems.profiles), s.client_names)
    if systems.availability is not None:
        read_availability(Path(systems.availability), s.client_names)


def partial_work_fits_the_run(s: Setting) -> None:
    """Partial work rescales each client's dense update (FedNova); FedKSeed's server step replays the clients'
    (seed, scalar) pairs instead, which the rescaling cannot reach."""
    c = s.config
    if c.systems is None or c.federation.round_deadline_s is None or c.systems.late_clients != "partial":
        return
    if c.federation.algorithm == "fedkseed":
        raise FedlmError(
            "`systems.late_clients: partial` cannot run with `federation.algorithm: fedkseed`: the server replays each client's "
            "seed pairs, so FedNova's rescaling of the update would be lost; use `late_clients: drop`"
        )


def fedbuff_without_round_state(s: Setting) -> None:
    """SCAFFOLD-like aggregators (client extras) and secure aggregation need every update of one synchronous round,
    computed from the same server state; FedBuff's buffer holds stale updates, each weighted on its own."""
    c = s.config
    if c.systems is None or c.systems.mode != "fedbuff":
        return
    prefix = "`systems.mode: fedbuff`"
    extras = s.aggregator.uploads_extras
    if extras is not None:
        raise FedlmError(
            f"{prefix} cannot run with `aggregation.name: {c.aggregation.name}`: its clients upload {extras} against the "
            "server state of one synchronous round, and stale ones would corrupt that state; choose an aggregator without client extras (e.g. fedavg)"
        )
    if c.privacy.secure_aggregation is not None:
        raise FedlmError(
            f"{prefix} cannot run under `{SECAGG}`: SecAgg+ masks cancel only in the sum of one synchronous round's clients, "
            "and FedBuff's buffer scales each update by its own staleness; remove one of them"
        )


def fedbuff_fits_the_run(s: Setting) -> None:
    """FedBuff's server steps on a buffer of updates computed from different global models: anything that needs
    every client of a synchronous round to start from the same model, or the whole round at once, is refused."""
    c = s.config
    if c.systems is None or c.systems.mode != "fedbuff":
        return
    refused = {
        "federation.round_deadline_s": (c.federation.round_deadline_s is not None, "FedBuff has no rounds to end; slow clients just arrive later"),
        "privacy.client_dp": (c.privacy.client_dp is not None, "its accounting assumes clients sampled afresh each synchronous round"),
        "attack": (c.attack.name is not None, "the attack harness alters a synchronous round's updates together"),
        "compression": (
            c.compression.uplink is not None or c.compression.downlink is not None,
            "the codecs' per-round state (error feedback, the clients' replica) is not wired into FedBuff's loop",
        ),
        "personalization": (c.personalization.method is not None, "personal state is not wired into FedBuff's loop"),
        "aggregation.lora": (
            c.aggregation.lora not in ("naive", "ffa"),
            "this LoRA mode rebuilds the clients' adapters from one round's common start; use naive or ffa",
        ),
        "federation.algorithm": (c.federation.algorithm != "gradient", "FedKSeed's seed replay is per synchronous round"),
        "federation.round_retries": (c.federation.round_retries > 0, "a failed client is simply replaced by the next one started"),
        "teacher": (c.teacher.mode is not None, "the teacher's per-round labelling is not wired into FedBuff's loop"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise FedlmError(f"`systems.mode: fedbuff` cannot run with `{key}`: {why}; remove one of them")


def fedbuff_buffer_fits(s: Setting) -> None:
    """A server step needs ``min_clients`` updates from one buffer, and only so many clients can train at once."""
    c = s.config
    if c.systems is None or c.systems.mode != "fedbuff":
        return
    buff = c.systems.fedbuff
    if c.federation.min_clients > buff.buffer_size:
        raise FedlmError(f"`federation.min_clients` ({c.federation.min_clients}) must be <= `systems.fedbuff.buffer_size` ({buff.buffer_size})")
    if buff.concurrency is not None and s.num_clients is not None and buff.concurrency > s.num_clients:
        raise FedlmError(f"`systems.fedbuff.concurrency` must be <= the number of clients ({s.num_clients}), got {buff.concurrency}")


def systems_without_a_stream(s: Setting) -> None:
    """The clock's availability and a continual stream's membership both decide which clients a round may sample;
    the two are not combined yet."""
    c = s.config
    if c.systems is not None and c.continual is not None:
        raise FedlmError(
            "`systems` and `continual` both decide which clients a round samples (device availability vs the stream's "
            "membership) and are not combined yet; remove one of them"
        )
