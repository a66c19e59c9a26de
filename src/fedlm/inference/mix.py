"""Combining the global and a client's personal model at inference: ``global | local | adapter | logits``.

With w the personal side's weight (fixed, or per input: :mod:`fedlm.inference.weighting`), ΔW_g the global adapter
and ΔW_l the client's adapter:

- ``global``: W0 + ΔW_g.
- ``local``: the personal model. ``combine: replace`` (personal.json): W0 + ΔW_l; ``dual`` (FedDPA's local adapter,
  kept beside the global one): W0 + α ΔW_g + (1 - α) ΔW_l with α the run's fixed weight on the global adapter
  (personal.json ``weight``, default 0.5), as the personalization evaluation computes it.
- ``adapter``: both LoRA adapters active in one forward pass, their outputs weighted per input row:
  W0 + (1 - w) ΔW_g + w ΔW_l (w = 0: the global model; w = 1: the local adapter alone). This is FedDPA's weighted
  sum of the global and local adapters (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models",
  NeurIPS 2024, Sec. 4.3), computed as peft's ``cat`` merge (``add_weighted_adapter``) would, without building a
  merged adapter per weight: a forward hook scales each adapter's ``lora_B`` output by its row's coefficient (a
  test holds the two equal).
- ``combine: prompt`` clients (a personal soft prompt before the global adapter's inputs, pFedPT-style): ``local``
  puts the client's prompt embeddings in front of every row's input (peft prompt tuning's placement: before the
  left padding, positions counted over real tokens); ``logits`` mixes that model with the global one.
- ``logits``: the two models' next-token distributions mixed. ``combine: linear``: p = w p_local + (1 - w) p_global
  (a mixture); ``product``: p ∝ p_local^w p_global^(1 - w) (a product of experts, Hinton 2002, renormalised).
  Two forward passes, one KV cache each.

Everything runs on the one base model of :class:`fedlm.inference.run.InferenceRun`: adapters are switched or
stacked, never copied. :class:`MixedModel` is the scoring API (:meth:`MixedModel.token_logprobs`,
:meth:`MixedModel.loss`) and the decoder factory (:meth:`MixedModel.start`) for generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedlm.config.schema.inference import MIXES, InferenceConfig, Mix
from fedlm.core.errors import FedlmError
from fedlm.inference.run import GLOBAL, InferenceRun
from fedlm.inference.weighting import auto_weight, mean_pooled_hidden

IGNORE_INDEX = -100


@dataclass
class Pass:
    """One forward pass: the adapters active in it, each with its per-row output coefficient (None: 1 for every
    row), and the rows' soft prompts placed before their inputs (``combine: prompt`` clients; zero-masked on rows
    without one)."""

    adapters: list[tuple[str, torch.Tensor | None]]
    prefix: torch.Tensor | None = None  # (B, n, H)
    prefix_mask: torch.Tensor | None = None  # (B, n), 1 on rows with a soft prompt


@dataclass(frozen=True)
class MixSpec:
    """Which model answers: the mix, the client (None for ``global``), the personal weight and the logits combine."""

    mix: Mix = "global"
    client: str | None = None
    weight: float | Literal["auto"] = 0.5
    max_weight: float = 1.0
    combine: Literal["linear", "product"] = "linear"

    @classmethod
    def from_config(cls, config: InferenceConfig, client: str | None = None, **overrides: Any) -> MixSpec:
        """The ``inference`` section's mix for ``client``, with CLI overrides (None values ignored)."""
        values: dict[str, Any] = {"mix": config.mix, "weight": config.weight, "max_weight": config.max_weight, "combine": config.combine}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(client=client, **values)

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests with the same key can share a batch (same adapters; auto weights are per row)."""
        return (self.mix, self.client, self.weight, self.max_weight, self.combine)


def mix_logprobs(local: torch.Tensor, global_: torch.Tensor, weight: torch.Tensor, combine: str) -> torch.Tensor:
    """Mix two log-distributions over the last axis with per-row weight ``weight`` (B,) of ``local``; returns log p.

    linear: log(w p_l + (1 - w) p_g); product: log_softmax(w log p_l + (1 - w) log p_g).
    """
    w = weight.to(local.dtype).view(-1, *([1] * (local.dim() - 1)))  # (B, 1, ...)
    if combine == "product":
        return torch.log_softmax(w * local + (1 - w) * global_, dim=-1)
    return torch.logaddexp(local + torch.log(w), global_ + torch.log1p(-w))


class MixedModel:
    """The run's model under any mix. Not thread-safe: one caller at a time (the server uses one worker thread)."""

    def __init__(self, run: InferenceRun) -> None:
        self.run = run
        self.model = run.model
        self._lora_layers = [m for m in run.model.modules() if isinstance(m, LoraLayer)]
        self._active: tuple[str, ...] = (GLOBAL,)

    # -- checks ----------------------------------------------------------------------------------------------------
    def check(self, spec: MixSpec) -> None:
        """Refuse a mix this run cannot compute, naming the client and what to do."""
        if spec.mix not in MIXES:
            raise FedlmError(f"`inference.mix` must be one of {', '.join(MIXES)}, got {spec.mix!r}")
        if spec.mix == "global":
            return
        if spec.client is None:
            raise FedlmError(f"`inference.mix: {spec.mix}` needs a client (--client NAME); `global` needs none")
        if not self.run.clients:
            raise FedlmError(
                f"`inference.mix: {spec.mix}` for client {spec.client!r}: {self.run.root} has no personal adapters "
                "(clients/<name>/adapter/); train with a `personalization` method, or use `--mix global`"
            )
        client = self.run.client(spec.client)
        if spec.mix == "adapter" and not self.run.is_lora:  # (a dual client on a non-LoRA run is refused at open)
            raise FedlmError(
                f"`inference.mix: adapter` weights LoRA adapters inside one forward pass; this run's `peft.method` is "
                f"{self.run.config.peft.method!r}: use `--mix logits` to mix the two models' distributions instead"
            )
        if spec.mix == "adapter" and client.combine == "prompt":
            raise FedlmError(
                f"client {client.name!r}'s personal model is the global adapter with its own soft prompt "
                "(`personalization.method: prompt`): there is no second LoRA adapter to weight; use `--mix local` or `--mix logits`"
            )
        if spec.weight == "auto" and spec.mix in ("adapter", "logits"):
            auto_weight(torch.zeros(1, 1), client.centroid, spec.max_weight, client.name)  # refuses a missing profile

    # -- weights and passes ----------------------------------------------------------------------------------------
    def personal_weights(self, spec: MixSpec | Sequence[MixSpec], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The personal model's weight per row (B,): the fixed weight, or the auto weight of each row's tokens against
        its client's centroid. ``spec``: one for every row, or one per row."""
        specs = _per_row(spec, input_ids.shape[0])
        weights = torch.zeros(len(specs), device=input_ids.device)
        auto = [i for i, s in enumerate(specs) if s.weight == "auto" and s.mix in ("adapter", "logits")]
        pooled = mean_pooled_hidden(self.model, input_ids[auto], attention_mask[auto]) if auto else None
        for i, s in enumerate(specs):
            if s.mix not in ("adapter", "logits"):
                continue
            if s.weight != "auto":
                weights[i] = float(s.weight)
                continue
            assert pooled is not None and s.client is not None  # check() ran
            client = self.run.client(s.client)
            weights[i] = auto_weight(pooled[auto.index(i)].unsqueeze(0), client.centroid, s.max_weight, client.name)[0]
        return weights

    def passes(self, spec: MixSpec | Sequence[MixSpec], weight: torch.Tensor) -> list[Pass]:
        """The forward passes of the rows' mixes (two for ``logits``: global first, personal second).

        Each row adds its coefficients on the adapters it uses; an adapter whose coefficient is 1 in every row runs
        unscaled. Rows of different clients share a pass (LoRA runs: :meth:`batch_key`), each adapter's output zeroed
        on the other rows."""
        specs = _per_row(spec, weight.shape[0])
        if not isinstance(self.model, PeftModel):
            return [Pass([])]
        coeffs: dict[str, torch.Tensor] = {}
        prompts: dict[int, torch.Tensor] = {}

        def add(name: str, row: int, value: torch.Tensor | float) -> None:
            coeffs.setdefault(name, torch.zeros_like(weight))[row] += value

        logits = specs[0].mix == "logits"
        for row, s in enumerate(specs):
            if s.mix == "global":
                add(GLOBAL, row, 1.0)
                continue
            assert s.client is not None  # check() ran
            client = self.run.client(s.client)
            if s.mix == "adapter":
                add(GLOBAL, row, 1 - weight[row])
                add(client.adapter, row, weight[row])
            elif client.combine == "dual":  # local or the personal side of logits: FedDPA at the run's weight
                add(GLOBAL, row, 1 - client.dual_weight)
                add(client.adapter, row, client.dual_weight)
            else:
                add(client.adapter, row, 1.0)
                if client.soft_prompt is not None:
                    prompts[row] = client.soft_prompt
        personal = Pass([(name, None if bool((c == 1).all()) else c) for name, c in coeffs.items()])
        if prompts:
            first = next(iter(prompts.values()))
            personal.prefix = torch.zeros(len(specs), *first.shape, device=weight.device)  # (B, n, H)
            personal.prefix_mask = torch.zeros(len(specs), first.shape[0], dtype=torch.long, device=weight.device)  # (B, n)
            for row, prompt in prompts.items():
                personal.prefix[row] = prompt
                personal.prefix_mask[row] = 1
        return [Pass([(GLOBAL, None)]), personal] if logits else [personal]

    def batch_key(self, spec: MixSpec) -> tuple[Any, ...]:
        """Requests with equal keys can share a batch. LoRA runs: one pass for every client and every mix but
        ``logits`` (two passes, one combine); other methods: the same adapters (same client and mix)."""
        if not self.run.is_lora:
            return spec.key
        return ("logits", spec.combine) if spec.mix == "logits" else ("one-pass",)

    def forward(self, one_pass: Pass, **inputs: Any) -> Any:
        """The model's forward with the adapters of ``one_pass`` active and their outputs scaled per row."""
        module: torch.nn.Module = self.model
        with self._adapters(one_pass):
            return module(**inputs)

    def prefill(self, one_pass: Pass, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> tuple[Any, torch.Tensor]:
        """The forward over whole sequences (B, T), the pass's soft prompts in front; returns the output (its logits
        cut to the T input positions) and the attention mask used (B, n + T) for the steps that follow."""
        if one_pass.prefix is None or one_pass.prefix_mask is None:
            out = self.forward(one_pass, input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask), **inputs)
            return out, attention_mask
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, H)
        embeds = torch.cat([one_pass.prefix.to(embeds.dtype), embeds], dim=1)  # (B, n + T, H)
        mask = torch.cat([one_pass.prefix_mask, attention_mask], dim=1)  # (B, n + T)
        out = self.forward(one_pass, inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), **inputs)
        out.logits = out.logits[:, one_pass.prefix.shape[1] :]  # (B, T, V)
        return out, mask

    @contextmanager
    def _adapters(self, one_pass: Pass) -> Iterator[None]:
        if not isinstance(self.model, PeftModel):
            yield
            return
        names = tuple(name for name, _ in one_pass.adapters)
        if names != self._active:
            self.model.base_model.set_adapter(list(names) if len(names) > 1 else names[0])  # type: ignore[operator]  # a LoraModel, typed by torch as a Tensor attribute
            self._active = names
        handles = []
        for name, coeff in one_pass.adapters:
            if coeff is None:
                continue
            for layer in self._lora_layers:
                if name in layer.lora_B:
                    handles.append(layer.lora_B[name].register_forward_hook(_row_scale(coeff)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- scoring ---------------------------------------------------------------------------------------------------
    def token_logprobs(self, spec: MixSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels[:, t] | tokens before t) under ``spec``, shape (B, T), 0 where ``labels`` is -100 (and at t = 0).

        Labels are aligned with ``input_ids`` (as Hugging Face's causal-LM ``labels``: the shift happens here).
        ``weight: auto`` weighs each row by its prompt tokens (mask 1 and label -100; all its tokens when none is).
        """
        prompt = attention_mask * (labels == IGNORE_INDEX)
        prompt = torch.where(prompt.sum(dim=1, keepdim=True) > 0, prompt, attention_mask)
        logp = self.logprobs(spec, input_ids, attention_mask, prompt)  # (B, T, V)
        target = labels[:, 1:].clamp(min=0)  # (B, T-1)
        picked = logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        picked = torch.where(labels[:, 1:] == IGNORE_INDEX, torch.zeros_like(picked), picked)
        return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)  # (B, T)

    def logprobs(self, spec: MixSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, weight_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(next token | tokens up to t) under ``spec`` at every position, shape (B, T, V) float32.
        ``weight_mask``: the tokens ``weight: auto`` pools over (default: ``attention_mask``)."""
        self.check(spec)
        weight = self.personal_weights(spec, input_ids, attention_mask if weight_mask is None else weight_mask)
        with torch.no_grad():
            lps = [
                torch.log_softmax(self.prefill(p, input_ids, attention_mask)[0].logits.float(), -1) for p in self.passes(spec, weight)
            ]  # (B, T, V)
        return lps[0] if len(lps) == 1 else mix_logprobs(lps[1], lps[0], weight.to(lps[0].device), spec.combine)

    def loss(self, spec: MixSpec, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood over the labelled tokens of ``batch`` (input_ids, attention_mask, labels)."""
        labels = batch["labels"]
        logp = self.token_logprobs(spec, batch["input_ids"], batch["attention_mask"], labels)
        count = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return -logp.sum() / count

    # -- generation ------------------------------------------------------------------------------------------------
    def start(self, spec: MixSpec | Sequence[MixSpec], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Decoder:
        """A decoder primed with the left-padded prompts (B, T): its ``logprobs`` are the next token's (B, V).
        ``spec``: one for all rows, or one per row (equal :meth:`batch_key`)."""
        specs = _per_row(spec, input_ids.shape[0])
        for s in dict.fromkeys(specs):
            self.check(s)
        if len({self.batch_key(s) for s in specs}) > 1:
            raise ValueError("rows of one batch must share MixedModel.batch_key")
        weight = self.personal_weights(specs, input_ids, attention_mask)
        return Decoder(self, self.passes(specs, weight), weight.to(input_ids.device), specs[0].combine, input_ids, attention_mask)


class Decoder:
    """Incremental decoding under one mix: one KV cache per forward pass; positions as Hugging Face's ``generate``
    (left padding: cumulative sum of the mask, pad positions 1)."""

    def __init__(self, mixed: MixedModel, passes: list[Pass], weight: torch.Tensor, combine: str, input_ids: torch.Tensor, mask: torch.Tensor):
        self.mixed, self.passes, self.weight, self.combine = mixed, passes, weight, combine
        self.caches: list[Any] = []
        self.masks: list[torch.Tensor] = []  # per pass: its soft prompts' columns, then the inputs'
        outs = []
        with torch.no_grad():
            for one_pass in passes:
                out, pass_mask = mixed.prefill(one_pass, input_ids, mask, use_cache=True)
                self.caches.append(out.past_key_values)
                self.masks.append(pass_mask)
                outs.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))  # (B, V)
        self.logprobs = self._combine(outs)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the chosen tokens (B,); returns the next token's log-probabilities (B, V)."""
        outs = []
        with torch.no_grad():
            for i, one_pass in enumerate(self.passes):
                self.masks[i] = torch.cat([self.masks[i], torch.ones_like(self.masks[i][:, :1])], dim=1)
                position = self.masks[i].sum(dim=1, keepdim=True) - 1  # (B, 1)
                out = self.mixed.forward(
                    one_pass,
                    input_ids=tokens.unsqueeze(1),
                    attention_mask=self.masks[i],
                    position_ids=position,
                    past_key_values=self.caches[i],
                    use_cache=True,
                )
                self.caches[i] = out.past_key_values
                outs.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))  # (B, V)
        self.logprobs = self._combine(outs)
        return self.logprobs

    def _combine(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return outs[0] if len(outs) == 1 else mix_logprobs(outs[1], outs[0], self.weight, self.combine)


def _per_row(spec: MixSpec | Sequence[MixSpec], rows: int) -> list[MixSpec]:
    if isinstance(spec, MixSpec):
        return [spec] * rows
    if len(spec) != rows:
        raise ValueError(f"{len(spec)} mix specs for {rows} rows")
    return list(spec)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left- or right-) padded batch: 0.. over real tokens, 1 at pads (as ``generate``)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def _row_scale(coeff: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook multiplying a ``lora_B`` output (B, T, out) by its row's coefficient (B,)."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * coeff.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    return hook
