"""Incentive-aware participation (``federation.sampling: contribution``): clients drawn in proportion to a softmax
of their cumulative contribution scores, with a floor so that nobody starves.

p_i = floor / n + (1 - floor) * softmax(z / T)_i, with z the cumulative scores standardised over the clients
(mean 0, standard deviation 1; all 0 while the scores are equal), T = ``contribution.temperature`` in standard
deviations and floor = ``contribution.floor``. The round's ``clients_per_round`` clients are drawn without
replacement with these weights, seeded per round.

The fairness trade-off: rewarding high scorers with more rounds speeds training on the data the validation set
favours and starves free-riders (Kang et al. 2019; Zeng et al. 2021's incentive survey), but a client whose data is
rare or unlike the validation set also scores low and is heard less, so the global model drifts further from it,
and its score, only earned in rounds it joins, recovers slowly. The floor bounds this: every client keeps at least
floor / n of the draw weight (floor = 1 is uniform sampling); a higher temperature flattens the preference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlm.core.seeding import derive_seed, torch_generator


def sampling_probabilities(scores: Mapping[str, float], clients: Sequence[str], temperature: float, floor: float) -> list[float]:
    """Each client's draw weight (summing to 1): the floored softmax of the standardised cumulative scores."""
    values = [float(scores.get(c, 0.0)) for c in clients]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    z = [(v - mean) / std if std > 0 else 0.0 for v in values]
    top = max(z)
    exp = [math.exp((x - top) / temperature) for x in z]
    total = sum(exp)
    return [floor / n + (1.0 - floor) * e / total for e in exp]


@dataclass
class ContributionSampler:
    """The round's clients, drawn by :func:`sampling_probabilities` of ``scores()`` (the observer's totals)."""

    scores: Callable[[], Mapping[str, float]]
    temperature: float
    floor: float

    def __call__(self, client_names: Sequence[str], per_round: int | None, seed: int, round_num: int) -> list[str]:
        if per_round is None or per_round >= len(client_names):
            return list(client_names)
        weights = torch.tensor(sampling_probabilities(self.scores(), client_names, self.temperature, self.floor), dtype=torch.float64)
        generator = torch_generator(derive_seed(seed, "sample-clients-by-contribution", round_num))
        chosen = torch.multinomial(weights, per_round, replacement=False, generator=generator)
        return [client_names[i] for i in sorted(chosen.tolist())]
