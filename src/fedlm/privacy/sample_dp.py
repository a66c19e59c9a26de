"""Sample-level DP-SGD inside one client's local training (``privacy.sample_dp``).

DP-SGD is Algorithm 1 of Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep Learning with
Differential Privacy" (CCS). Every local step, on a lot drawn by Poisson sampling:

1. per-example gradients g_i of the example's loss (the token-mean cross-entropy over its response tokens) with
   respect to the trainable parameters only (the LoRA factors; the base model is frozen);
2. each clipped to L2 norm C = ``max_grad_norm`` over all trainable tensors together: g_i / max(1, ||g_i|| / C);
3. summed, Gaussian noise N(0, sigma^2 C^2 I) added, divided by the expected lot size L = q n;
4. the optimizer (AdamW or SGD) steps on that gradient. Anything computed from it afterwards is post-processing:
   FedProx's proximal term (data-independent, its gradient is added after the noise), SCAFFOLD option II's
   correction, the rank mask, weight decay.

Per-example gradients come from **Opacus** (``opacus.GradSampleModule``, hooks mode): it wraps the PEFT model as it
is, since the only trainable modules are the ``lora_A``/``lora_B`` ``nn.Linear`` layers, for which Opacus has an
exact per-sample gradient rule (``einsum`` over the batch of activations and backprops); the frozen base layers
are never touched. Clipping, summing and noise are the few lines of :func:`privatise`, written here rather than
through ``opacus.optimizers.DPOptimizer`` so that the trainer's hooks (FedProx, SCAFFOLD II, the rank mask) run
between the noise and the optimizer step, and so that the noise comes from a CPU generator seeded from
(seed, round, client) on any device (``fedlm.core.seeding``), which makes a resumed run replay exactly.

Sampling is real Poisson sampling (Opacus's ``DPDataLoader`` semantics): at each step every example of the client
joins the lot independently with probability q = min(1, batch_size / n), so lots vary in size (and may be empty:
then the gradient is the noise alone). Accounting is that of the Poisson-subsampled Gaussian mechanism
(:mod:`fedlm.privacy.accounting`): a client's epsilon after its t-th round composes ``local_steps x`` (rounds it
took part in) steps at its own q, at the run's delta, with the run's accountant.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlm.core.sampling import sample_clients
from fedlm.core.seeding import derive_seed, torch_generator
from fedlm.privacy.accounting import AccountantName, epsilon, solve_noise_multiplier

if TYPE_CHECKING:
    from fedlm.config.schema import ExperimentConfig

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings of a run, and what the trainer needs to report each client's epsilon.

    ``client_names``, ``clients_per_round`` and ``seed`` let :meth:`rounds_joined` replay the server's (stateless)
    client sampling, so the epsilon after a resume is the one an uninterrupted run reports.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: AccountantName = "rdp"
    client_names: tuple[str, ...] = ()
    clients_per_round: int | None = None
    seed: int = 0

    def rounds_joined(self, client_id: str, round_num: int) -> int:
        """How many of rounds 1..``round_num`` sampled ``client_id`` (all of them for an unknown client: an upper bound)."""
        if self.clients_per_round is None or client_id not in self.client_names:
            return round_num
        return sum(client_id in sample_clients(self.client_names, self.clients_per_round, self.seed, r) for r in range(1, round_num + 1))

    def epsilon_spent(self, client_id: str, round_num: int, steps_per_round: int, batch_size: int, num_examples: int) -> float:
        """The client's epsilon at ``delta`` after its steps up to round ``round_num`` (Poisson-subsampled Gaussian)."""
        steps = steps_per_round * self.rounds_joined(client_id, round_num)
        return epsilon(self.noise_multiplier, sampling_rate(batch_size, num_examples), steps, self.delta, self.accountant)

    @contextmanager
    def privatiser(self, model: torch.nn.Module, batch_size: int, num_examples: int, seed: int) -> Iterator[Privatiser]:
        """A :class:`Privatiser` over ``model`` for one client's round; Opacus's hooks are removed on exit."""
        from opacus import GradSampleModule  # noqa: PLC0415 - heavy import: only when DP-SGD runs

        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            expected = sampling_rate(batch_size, num_examples) * num_examples
            yield Privatiser(wrapped, self, expected, torch_generator(derive_seed(seed, "dp-sgd-noise")))
        finally:
            wrapped._close()  # removes the hooks and the per-sample attributes from the parameters


def sampling_rate(batch_size: int, num_examples: int) -> float:
    """q = min(1, batch_size / n): the probability that an example joins a lot (expected lot size batch_size)."""
    return min(1.0, batch_size / max(num_examples, 1))


def poisson_batches(num_examples: int, num_steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``num_steps`` lots, each example in each independently with probability :func:`sampling_rate` (Abadi et al.
    2016, Sec. 3.1 "lots"; Opacus's ``DPDataLoader``); seeded, so a round replays."""
    generator = torch_generator(derive_seed(seed, "poisson-lots"))
    q = sampling_rate(batch_size, num_examples)
    return [torch.nonzero(torch.rand(num_examples, generator=generator) < q).flatten().tolist() for _ in range(num_steps)]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's token-mean next-token cross-entropy over its response tokens, shape (B,) (0 with none)."""
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return token_loss.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def privatise(
    per_sample: Mapping[str, torch.Tensor], max_grad_norm: float, noise_multiplier: float, lot_size: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Abadi et al. 2016, Algorithm 1, lines 5-7: ``(sum_i g_i / max(1, ||g_i|| / C) + N(0, sigma^2 C^2 I)) / L``.

    ``per_sample`` maps each trainable tensor's name to its per-example gradients (first dimension: the lot); the
    norm of g_i runs over all tensors together. Noise is drawn in float32 on the CPU from ``generator`` (tensor by
    tensor, in the mapping's order) and moved to each tensor's device.
    """
    first = next(iter(per_sample.values()))
    norms = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)
    for g in per_sample.values():
        norms += g.to(torch.float32).flatten(1).pow(2).sum(dim=1)
    scale = (max_grad_norm / norms.sqrt()).clamp(max=1.0)  # 1 / max(1, ||g_i|| / C); a zero gradient gets 1
    out: dict[str, torch.Tensor] = {}
    for name, g in per_sample.items():
        clipped_sum = torch.einsum("i,i...->...", scale, g.to(torch.float32))
        noise = torch.normal(0.0, noise_multiplier * max_grad_norm, size=tuple(clipped_sum.shape), generator=generator)
        out[name] = (clipped_sum + noise.to(clipped_sum.device)) / lot_size
    return out


@dataclass
class Privatiser:
    """DP-SGD gradients for one client's round: per-example gradients through Opacus, then :func:`privatise`."""

    wrapped: Any  # opacus.GradSampleModule around the PEFT model
    settings: SampleDP
    lot_size: float
    generator: torch.Generator

    def backward(self, named: Mapping[str, torch.nn.Parameter], batch: Mapping[str, torch.Tensor] | None) -> float | None:
        """Set every trainable ``param.grad`` to the DP-SGD gradient of ``batch`` (None: an empty lot, noise only);
        returns the lot's mean per-example loss (None for an empty lot)."""
        loss: float | None = None
        if batch is None:
            per_sample = {name: torch.zeros((1, *p.shape), device=p.device) for name, p in named.items()}
        else:
            logits = self.wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = per_example_loss(logits, batch["labels"])
            with warnings.catch_warnings():  # the first LoRA layers' inputs (embeddings) need no gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()  # loss_reduction="sum": grad_sample[i] is the gradient of example i's loss
            loss = float(losses.detach().mean())
            per_sample = {name: _grad_sample(name, p) for name, p in named.items()}
        private = privatise(per_sample, self.settings.max_grad_norm, self.settings.noise_multiplier, self.lot_size, self.generator)
        for name, p in named.items():
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus's per-sample tensors: consumed
            p.grad = private[name].to(p.dtype)  # replaces the plain gradient the backward also accumulated
        return loss


def _grad_sample(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """Opacus's per-sample gradient of ``param`` (one forward and backward per lot, so one tensor)."""
    grad_sample = getattr(param, "grad_sample", None)
    if not isinstance(grad_sample, torch.Tensor):
        raise RuntimeError(f"Opacus computed no per-sample gradient for {name}; DP-SGD needs one for every trainable tensor")
    return grad_sample


# --------------------------------------------------------------------------------------------- config


def sample_dp_settings(config: ExperimentConfig, client_sizes: Mapping[str, int]) -> SampleDP | None:
    """The run's DP-SGD settings, or None without ``privacy.sample_dp``; a ``target_epsilon`` is solved for the worst
    client (the smallest dataset, hence the largest q, taking part in every round: local_steps x rounds steps)."""
    dp = config.privacy.sample_dp
    if dp is None:
        return None
    fed, privacy = config.federation, config.privacy
    q = sampling_rate(fed.batch_size, min(client_sizes.values())) if client_sizes else 1.0  # the smallest client
    sigma = solve_noise_multiplier(
        "privacy.sample_dp", dp.noise_multiplier, dp.target_epsilon, q, fed.local_steps * fed.rounds, privacy.delta, privacy.accountant
    )
    names = tuple(client_sizes)
    per_round = fed.clients_per_round if fed.clients_per_round is not None and fed.clients_per_round < len(names) else None
    return SampleDP(sigma, dp.max_grad_norm, privacy.delta, privacy.accountant, names, per_round, config.seed)
