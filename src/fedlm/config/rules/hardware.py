"""Rules on the model's device, quantization and attention, data-parallel clients and Flower's simulation engine."""

from __future__ import annotations

from fedlm.config.rules.setting import Setting
from fedlm.core.errors import FedlmError
from fedlm.models.hardware import attn_refusal, device_refusal, engine_refusal, quantization_refusal, resolve_device

# ------------------------------------------------------------------------------------------ model hardware knobs


def model_device_exists(s: Setting) -> None:
    """``model.device`` names a device this machine has: no ``cuda`` without a GPU, no ``cuda:3`` on two GPUs."""
    reason = device_refusal(s.config.model.device)
    if reason is not None:
        raise FedlmError(reason)


def quantization_runs_on_device(s: Setting) -> None:
    """A quantized base needs bitsandbytes with a backend for the device (CPU since 0.48, CUDA)."""
    model = s.config.model
    reason = quantization_refusal(model.quantization, resolve_device(model.device))
    if reason is not None:
        raise FedlmError(reason)


def attention_runs_on_device(s: Setting) -> None:
    """``flash_attention_2`` needs a CUDA device and the flash-attn package."""
    model = s.config.model
    reason = attn_refusal(model.attn_implementation, resolve_device(model.device))
    if reason is not None:
        raise FedlmError(reason)


def full_needs_unquantized_base(s: Setting) -> None:
    """A 4-bit or 8-bit weight has no gradient step: ``full`` would train a model it cannot update."""
    quantization = s.config.model.quantization
    if quantization != "none" and s.config.peft.method == "full":
        raise FedlmError(
            f"`peft.method: full` trains every base weight, but `model.quantization: {quantization}` stores the base as "
            "frozen integer blocks that no optimizer step can update; use `model.quantization: none` for full "
            "fine-tuning, or a parameter-efficient method (e.g. `peft.method: lora`, QLoRA) on the quantized base"
        )


def checkpointing_fits_the_method(s: Setting) -> None:
    """Gradient checkpointing re-runs each layer's forward in the backward pass: peft's prefix tuning passes its
    prefixes as a key/value cache that the recomputation cannot replay, and Opacus's per-example gradient hooks
    (``privacy.sample_dp``) lose the activations they record in the forward."""
    c = s.config
    if not c.model.gradient_checkpointing:
        return
    if c.peft.method == "prefix_tuning":
        raise FedlmError(
            "`model.gradient_checkpointing: true` does not work with `peft.method: prefix_tuning` (peft passes the "
            "prefixes as a key/value cache, which checkpointing cannot recompute); set `model.gradient_checkpointing: "
            "false` or use `peft.method: prompt_tuning` or lora"
        )
    if c.privacy.sample_dp is not None:
        raise FedlmError(
            "`model.gradient_checkpointing: true` does not work with `privacy.sample_dp`: Opacus takes per-example "
            "gradients from activations its hooks record in the forward pass, which checkpointing discards and "
            "recomputes; set `model.gradient_checkpointing: false` (lower `federation.batch_size` to save memory)"
        )


# ------------------------------------------------------------------------------------------ data-parallel clients


def client_processes_not_in_ray_workers(s: Setting) -> None:
    """A data-parallel client's worker processes are started by the simulation or by a SuperNode's ClientApp; a Ray
    worker of Flower's simulation engine serves many clients and does not start them."""
    fed = s.config.federation
    if fed.client_processes > 1 and fed.runtime == "flower-simulation":
        raise FedlmError(
            f"`federation.client_processes: {fed.client_processes}` is not built for `federation.runtime: flower-simulation`: "
            "a Ray worker serves many clients and does not start data-parallel processes; give each client GPUs or CPUs "
            "through `federation.simulation_engine` instead, or use `federation.runtime: simulation` or `flower`"
        )


def client_processes_split_a_plain_batch(s: Setting) -> None:
    """Every process needs at least one example of each step's batch, and DP-SGD's Poisson lots with per-example
    clipping would need Opacus's own distributed path, which fedlm does not run."""
    fed, n = s.config.federation, s.config.federation.client_processes
    if n > 1 and s.config.privacy.sample_dp is not None:
        raise FedlmError(
            f"`federation.client_processes: {n}` cannot run with `privacy.sample_dp`: DP-SGD's per-example clipping "
            "and noise would have to be split among the processes (Opacus's DP-DDP path), which fedlm does not do; "
            "use `federation.client_processes: 1` or remove `privacy.sample_dp`"
        )
    if n > fed.batch_size:
        raise FedlmError(
            f"`federation.client_processes` ({n}) must be <= `federation.batch_size` ({fed.batch_size}): each process "
            "takes a share of every step's batch; raise `federation.batch_size` or lower `federation.client_processes`"
        )


# ------------------------------------------------------------------------------------------ Flower's simulation engine


def simulation_engine_fits_this_machine(s: Setting) -> None:
    """``flower-simulation`` reserves ``num_cpus``/``num_gpus`` per client in Ray: refuse at load what Ray could not
    give (more than the machine has, a GPU that is not there, a client device its worker cannot see), never a CUDA
    traceback in the middle of a round (:func:`fedlm.models.hardware.engine_refusal`)."""
    if s.config.federation.runtime != "flower-simulation":
        return
    engine = s.config.federation.simulation_engine
    reason = engine_refusal(engine.num_cpus, engine.num_gpus, engine.ray_cpus, engine.address, s.config.model.device)
    if reason is not None:
        raise FedlmError(reason)


#: The rules judged at config load, in the order they are checked (the first refusal is reported).
