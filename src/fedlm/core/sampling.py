"""Seeded choices: which clients take part in a round, and which examples a client's steps use."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedlm.core.seeding import derive_seed, torch_generator

#: ``(client_names, per_round, seed, round_num) -> chosen``: how a round picks its clients (``federation.sampling``).
ClientSampler = Callable[[Sequence[str], "int | None", int, int], list[str]]


def sample_clients(client_names: Sequence[str], per_round: int | None, seed: int, round_num: int) -> list[str]:
    """The clients of round ``round_num``: all, or ``per_round`` drawn uniformly without replacement.

    Stateless (a function of seed and round), so a resumed run samples exactly as an uninterrupted one.
    """
    if per_round is None or per_round >= len(client_names):
        return list(client_names)
    generator = torch_generator(derive_seed(seed, "sample-clients", round_num))
    chosen = torch.randperm(len(client_names), generator=generator)[:per_round]
    return [client_names[i] for i in sorted(chosen.tolist())]


def batch_indices(num_examples: int, num_steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``num_steps`` batches drawn from successive seeded permutations of the client's examples (epochs).

    A batch never repeats an example unless the client has fewer than ``batch_size`` examples.
    """
    generator = torch_generator(seed)
    stream: list[int] = []
    needed = num_steps * batch_size
    while len(stream) < needed:
        stream.extend(torch.randperm(num_examples, generator=generator).tolist())
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(num_steps)]
