"""Explicit randomness: one seed in the config, derived per purpose, round and client; no global resets."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A stable 63-bit seed for ``(seed, *labels)``, e.g. ``derive_seed(0, "train", round, client)``."""
    key = ":".join(str(part) for part in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def torch_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, for sampling that must not touch the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG (dropout, init) seeded to ``seed``, restoring it afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
