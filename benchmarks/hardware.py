"""Hardware benchmark: per-step time, tokens/s and peak memory of one LoRA training step, float32 vs bfloat16 vs a
4-bit (QLoRA NF4) base, with and without gradient checkpointing.

Models: SmolLM2-135M (the default model, through fedlm's own loader) and randomly initialised Llama shapes built from a
config (no weights are needed to measure speed and memory): ``llama-1b`` (Llama-3.2-1B's shape) and, on a CUDA
machine, ``llama-7b`` (Llama-2-7B's shape, 4-bit QLoRA with checkpointing; goal: peak < 16 GB at batch 4 x 512).

The same script runs on a CPU and on a GPU machine: it detects CUDA. Each row runs in its own subprocess, so that
no row inherits another's memory. The peak is that of the training steps, weights included: on the CPU the largest
resident set size sampled during the steps (:class:`PeakRSS`: the whole process, Python and torch included), on CUDA
``torch.cuda.max_memory_allocated``. The step is fedlm's default
adapter (LoRA r=8 on q/k/v/o, AdamW) on random tokens; the first step is a warm-up and not timed.

    python benchmarks/hardware.py                       # every row for this machine (CPU: slow bf16 rows included)
    python benchmarks/hardware.py --models llama-1b --modes bfloat16 4bit --steps 0   # weight memory only
    python benchmarks/hardware.py --write-results       # also put the table into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from common import cpu_name

HERE = Path(__file__).resolve().parent
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {  # Llama-3.2-1B
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    "llama-7b": {  # Llama-2-7B
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
}
MODES = ("float32", "bfloat16", "4bit")
GPU_ONLY = {"llama-7b": [("4bit", True)]}  # the 7B shape: only the QLoRA row with checkpointing
MiB = 2**20


def compute_dtype(mode: str, device: torch.device) -> torch.dtype:
    """float32/bfloat16 rows compute in their dtype; a 4-bit base computes in what ``model.dtype: auto`` gives."""
    from fedlm.models.dtype import resolve_dtype  # noqa: PLC0415

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(mode) or resolve_dtype("auto", device)


def _quantize_layers(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every nn.Linear of the decoder layers by a bitsandbytes NF4 Linear4bit with double quantization (the
    layers ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    quantizes at load; the LM head stays unquantized, as transformers leaves it)."""
    import bitsandbytes as bnb  # noqa: PLC0415

    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
                layer.weight = weight.to(device)  # quantized here
                setattr(module, name, layer)
                del child


def random_llama(shape: str, mode: str, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Llama of ``shape`` on ``device`` in the row's storage."""
    from peft import prepare_model_for_kbit_training  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    dtype = compute_dtype(mode, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**SHAPES[shape], attn_implementation="sdpa"), dtype=dtype)
    model.requires_grad_(False)
    if mode == "4bit":
        _quantize_layers(model, dtype, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as fedlm's loader does
    return model


def load(model_name: str, mode: str, checkpointing: bool, device: torch.device) -> torch.nn.Module:
    """The row's base model, frozen, with checkpointing on or off."""
    from fedlm.config.schema import ModelConfig  # noqa: PLC0415
    from fedlm.models.hardware import enable_gradient_checkpointing  # noqa: PLC0415
    from fedlm.models.loading import load_base_model  # noqa: PLC0415

    if model_name == "smollm2-135m":
        dtype = str(compute_dtype(mode, device)).removeprefix("torch.")
        config = ModelConfig(
            name="smollm2-135m-instruct",
            dtype=dtype,
            device=str(device),  # type: ignore[arg-type]
            quantization="4bit" if mode == "4bit" else "none",
            gradient_checkpointing=checkpointing,
        )
        return load_base_model(config, device=device).model
    model = random_llama(model_name, mode, device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters and buffers, the decoder layers' parameters) in bytes, as held in memory; a 4-bit weight
    counts its packed codes and its quantization state (block scales, double-quantized)."""

    def size(p: torch.Tensor) -> int:
        state = getattr(p, "quant_state", None)
        extra = 0
        while state is not None:
            extra += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
            state = getattr(state, "state2", None)
        return p.numel() * p.element_size() + extra

    total = sum(size(t) for t in [*model.parameters(), *model.buffers()])
    layers = sum(size(p) for n, p in model.named_parameters() if ".layers." in n)
    return total, layers


class PeakRSS:
    """The process's largest resident set size while the block runs, sampled every 5 ms (on the CPU the lifetime
    peak, ``ru_maxrss``, would report the model's construction or quantization instead of its training)."""

    def __enter__(self) -> PeakRSS:
        self._process, self._stop = psutil.Process(), threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure_row(model_name: str, mode: str, checkpointing: bool, batch: int, seq: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Load the row's model, attach LoRA, run ``steps`` timed AdamW steps (after one warm-up) and measure."""
    from fedlm.config.schema import PeftConfig  # noqa: PLC0415
    from fedlm.models.adapters import attach_adapter  # noqa: PLC0415

    started = time.perf_counter()
    base = load(model_name, mode, checkpointing, device)
    total, layers = weight_bytes(base)
    model = attach_adapter(base, PeftConfig(r=8, alpha=16, dropout=0.0), seed=0)
    load_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    model.train()
    with PeakRSS() as rss:
        loss = _train(model, optimizer, ids, steps, device, times)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    step_s = statistics.median(times) if times else None
    return {
        "model": model_name,
        "mode": mode,
        "checkpointing": checkpointing,
        "device": str(device),
        "compute_dtype": str(compute_dtype(mode, device)).removeprefix("torch."),
        "adapter_dtypes": adapter_dtypes,
        "batch": batch,
        "seq": seq,
        "steps": len(times),
        "step_s": step_s,
        "tokens_per_s": batch * seq / step_s if step_s else None,
        "peak_mib": peak / MiB,
        "weights_mib": total / MiB,
        "layer_weights_mib": layers / MiB,
        "load_s": load_s,
        "loss": loss,
    }


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int, device: torch.device, times: list[float]
) -> float:
    """One warm-up step and ``steps`` timed ones (appended to ``times``); the last loss (no step at all with 0)."""
    loss = float("nan")
    for step in range(steps + 1 if steps else 0):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)  # (B, T) -> logits (B, T, V), mean next-token loss
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loss = float(out.loss.detach())
        if step:  # step 0 warms up
            times.append(time.perf_counter() - t0)
    return loss


def rows_for(models: list[str], modes: list[str], checkpointing: list[bool], cuda: bool) -> list[tuple[str, str, bool]]:
    """The (model, mode, checkpointing) rows to run on this machine."""
    rows = []
    for model in models:
        if model in GPU_ONLY:
            rows += [(model, m, c) for m, c in GPU_ONLY[model] if cuda and m in modes and c in checkpointing]
        else:
            rows += [(model, m, c) for m in modes for c in checkpointing]
    return rows


def run_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Each row in a fresh subprocess (its own peak memory); a row that fails is recorded with its error."""
    results = []
    for model, mode, ckpt in rows_for(args.models, args.modes, [c == "on" for c in args.checkpointing], device.type == "cuda"):
        batch, seq = args.batch or (4 if device.type == "cuda" else 1), args.seq or (512 if device.type == "cuda" else 32)
        cmd = [
            sys.executable,
            __file__,
            "--row",
            model,
            mode,
            "on" if ckpt else "off",
            "--batch",
            str(batch),
            "--seq",
            str(seq),
            "--steps",
            str(args.steps),
            "--device",
            str(device),
        ]
        print(f"{model} {mode} checkpointing={'on' if ckpt else 'off'} {batch}x{seq} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            results.append({"model": model, "mode": mode, "checkpointing": ckpt, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(lines[-1]))
        print(f"  {results[-1]}", flush=True)
    return results


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict[str, Any]], device: torch.device) -> str:
    """The results as a table, with the goals' checks."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [
        f"Machine: {machine}; torch {torch.__version__}; bitsandbytes {_bnb_version()}. LoRA r=8 on q/k/v/o, AdamW, "
        "random tokens; median of the timed steps after one warm-up; adapters float32 in every row.",
        "",
        "| model | base | compute | checkpointing | batch x seq | step (s) | tokens/s | peak MiB (steps) | weights MiB | decoder-layer weights MiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | - | {'on' if r['checkpointing'] else 'off'} | - | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['compute_dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} x {r['seq']} | "
            f"{_fmt(r['step_s'], '.2f')} | {_fmt(r['tokens_per_s'], '.1f')} | {r['peak_mib']:.0f} | {r['weights_mib']:.0f} | "
            f"{r['layer_weights_mib']:.0f} |"
        )
    lines += ["", *goals(results, device)]
    return "\n".join(lines)


def _bnb_version() -> str:
    from fedlm.models.hardware import bitsandbytes_version  # noqa: PLC0415

    return bitsandbytes_version() or "not installed"


def _find(results: list[dict[str, Any]], model: str, mode: str, ckpt: bool | None = None) -> dict[str, Any] | None:
    for r in results:
        if r["model"] == model and r["mode"] == mode and "error" not in r and (ckpt is None or r["checkpointing"] == ckpt):
            return r
    return None


def goals(results: list[dict[str, Any]], device: torch.device) -> list[str]:
    """The goal lines: bf16 speed-up, 4-bit weight memory on the 1B shape, the 7B QLoRA peak on a GPU."""
    out = []
    for model in ("smollm2-135m", "llama-1b"):
        f32, bf16 = _find(results, model, "float32", False), _find(results, model, "bfloat16", False)
        if f32 and bf16 and f32["tokens_per_s"] and bf16["tokens_per_s"]:
            ratio = bf16["tokens_per_s"] / f32["tokens_per_s"]
            out.append(
                f"- {model}: bfloat16 / float32 tokens/s = {ratio:.3f} (goal >= 1.4 where the hardware has bf16 "
                f"matrix units): {'PASS' if ratio >= 1.4 else 'not met'}"
            )
    bf16, q4 = _find(results, "llama-1b", "bfloat16"), _find(results, "llama-1b", "4bit")
    if bf16 and q4:
        total, layers = q4["weights_mib"] / bf16["weights_mib"], q4["layer_weights_mib"] / bf16["layer_weights_mib"]
        out.append(
            f"- llama-1b: 4-bit / bfloat16 weight memory = {total:.3f} for the whole model as trained, {layers:.3f} for "
            f"the quantized decoder layers (goal <= 0.5): {'PASS' if total <= 0.5 else 'not met'} / "
            f"{'PASS' if layers <= 0.5 else 'not met'}"
        )
    big = _find(results, "llama-7b", "4bit", True)
    if device.type != "cuda":
        out.append("- GPU rows (llama-7b 4-bit QLoRA, batch 4 x 512, checkpointing; goal peak < 16 GB): not measured, no CUDA device on this machine")
    elif big:
        out.append(
            f"- llama-7b 4-bit QLoRA with checkpointing, {big['batch']} x {big['seq']}: peak {big['peak_mib'] / 1024:.2f} GiB "
            f"(goal < 16 GB): {'PASS' if big['peak_mib'] * MiB < 16e9 else 'not met'}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b", "llama-7b"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CUDA, 1 on CPU")
    parser.add_argument("--seq", type=int, default=None, help="default: 512 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (0: load and weigh only)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-hardware"))
    parser.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    parser.add_argument("--row", nargs=3, metavar=("MODEL", "MODE", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.row:
        model, mode, ckpt = args.row
        print(json.dumps(measure_row(model, mode, ckpt == "on", args.batch, args.seq, args.steps, device)))
        return
    results = run_rows(args, device)
    table = markdown(results, device)
    sys.path.insert(0, str(HERE))
    from common import publish  # noqa: PLC0415

    publish(
        args.out,
        results,
        table,
        args.write_results,
        "<!-- hardware:start -->",
        "<!-- hardware:end -->",
        "Hardware: dtype, 4-bit base, gradient checkpointing (`benchmarks/hardware.py`)",
    )


if __name__ == "__main__":
    main()
