"""Framework overhead: the same optimizer steps as (a) a plain PyTorch+PEFT loop, (b) fedlm centralized, (c) fedlm
federated with 8 clients. Goals: time (c)/(a) <= 1.05 (evaluation excluded) and peak RSS (c) <= 1.1 x (a).

Each arm runs in a fresh subprocess (peak RSS = the child's ``ru_maxrss``); only training is timed. Run
``python benchmarks/overhead.py [--repeats 3] [--write-results]``; smoke: ``--model tiny-random-llama --steps 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedlm.config.io import validate_config
from fedlm.core.sampling import batch_indices, sample_clients
from fedlm.core.seeding import derive_seed

HERE = Path(__file__).resolve().parent
ARMS = {"plain": "(a) plain PyTorch+PEFT", "central": "(b) fedlm centralized", "federated": "(c) fedlm federated"}
ROUNDS, LR, SEED = 2, 1e-3, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TIME_GOAL, RSS_GOAL = 1.05, 1.10
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"


def build_config(args: argparse.Namespace) -> Any:
    """The one config of every arm: embedded WordNet data split iid among the clients, constant lr, no eval."""
    return validate_config(
        {
            "seed": SEED,
            "model": {"name": args.model},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS},
            "data": {
                "train": "embedded:wordnet_defs",
                "max_train_examples": args.max_train_examples,
                "system_prompt": "Answer with a short dictionary definition.",
                "max_length": max_length(args),
            },
            "partition": {"method": "iid", "num_clients": args.clients},
            "federation": {
                "rounds": ROUNDS,
                "clients_per_round": args.clients,
                "batch_size": args.batch_size,
                "local_steps": args.steps // (args.clients * ROUNDS),
                "lr": LR,
                "lr_schedule": "constant",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
            },
            "eval": {"max_examples": 8, "at_start": False, "generate": False},
        }
    )


def max_length(args: argparse.Namespace) -> int:
    """Tokens per example: 96, or 256 for the tiny model, whose byte-level tokenizer needs ~3x more tokens."""
    return args.max_length or (256 if args.model == "tiny-random-llama" else 96)


def hwm_kib() -> int:
    """Peak resident set size of this process so far, in KiB (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def padded_tokens(examples: list[Any], batches: list[list[int]]) -> int:
    """Token positions the model processes: per batch, batch size x longest example (right padding)."""
    return sum(len(ids) * max(len(examples[i].input_ids) for i in ids) for ids in batches)


def pad_batch(examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest example; labels -100 on padding (and on the prompt, already in labels)."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def arm_result(elapsed: float, steps: int, loss: float, tokens: int, hwm_before: int, loaded: Any, examples: list[Any]) -> dict[str, Any]:
    """One arm's measurements plus what it trained on (dtype, device, sequence lengths)."""
    lengths = [len(ex.input_ids) for ex in examples]
    return {
        "time_s": elapsed,
        "steps": steps,
        "mean_loss": loss,
        "padded_tokens": tokens,
        "hwm_before_train_kib": hwm_before,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "num_examples": len(lengths),
        "seq_len_mean": sum(lengths) / len(lengths),
        "seq_len_min": min(lengths),
        "seq_len_max": max(lengths),
    }


def arm_plain(config: Any, steps: int) -> dict[str, Any]:
    """(a) A hand-written LoRA loop; fedlm only loads the base model and tokenizes the examples (untimed)."""
    from peft import LoraConfig, get_peft_model

    from fedlm.data.prepare import prepare_federated_data
    from fedlm.models.loading import load_base_model

    loaded = load_base_model(config.model, seed=derive_seed(SEED, "base-init") % 2**31)
    data = prepare_federated_data(config.data, config.partition, config.eval, loaded.tokenizer, SEED)
    examples, bs = data.union_train(), config.federation.batch_size
    torch.manual_seed(derive_seed(SEED, "adapter-init") % 2**31)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = batch_indices(len(examples), steps, bs, derive_seed(SEED, "central"))
    pad_id, losses = loaded.tokenizer.pad_token_id, []
    hwm_before = hwm_kib()
    torch.manual_seed(derive_seed(SEED, "central"))
    model.train()
    started = time.perf_counter()
    for ids in batches:
        batch = {k: v.to(loaded.device) for k, v in pad_batch([examples[i] for i in ids], pad_id).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - started
    return arm_result(elapsed, len(losses), sum(losses) / len(losses), padded_tokens(examples, batches), hwm_before, loaded, examples)


def arm_central(config: Any, steps: int) -> dict[str, Any]:
    """(b) fedlm's trainer on the union of the clients' examples, one plan of ``steps`` steps."""
    from fedlm.core.task import LocalPlan
    from fedlm.experiment import build_session
    from fedlm.reporting.progress import RunConsole

    session = build_session(config, RunConsole(quiet=True))
    examples, bs = session.data.union_train(), config.federation.batch_size
    plan = LocalPlan(round=1, lrs=[LR] * steps, batch_size=bs, seed=derive_seed(SEED, "central"))
    trainer = session.trainer()
    hwm_before = hwm_kib()
    started = time.perf_counter()
    update = trainer.train("central", examples, session.initial_state, plan)
    elapsed = time.perf_counter() - started
    tokens = padded_tokens(examples, batch_indices(len(examples), steps, bs, plan.seed))
    return arm_result(elapsed, int(update.metrics["steps"]), update.metrics["loss"], tokens, hwm_before, session.loaded, examples)


def arm_federated(config: Any, steps: int) -> dict[str, Any]:
    """(c) ``ROUNDS`` rounds of ``ServerLoop.run_round`` over the simulation runtime (no evaluation, no checkpoints)."""
    from fedlm.aggregation.base import build_aggregator
    from fedlm.experiment import build_server_loop, build_session
    from fedlm.reporting.metrics_log import MetricsLog
    from fedlm.reporting.progress import RunConsole
    from fedlm.reporting.run_dir import RunDir

    console = RunConsole(quiet=True)
    session = build_session(config, console)
    fed, data = config.federation, session.data
    aggregator = build_aggregator(config.aggregation.name, config.aggregation.params())
    plans = [
        (data.client_train[c], derive_seed(SEED, "local", rnd, c))
        for rnd in range(1, fed.rounds + 1)
        for c in sample_clients(data.client_names, fed.clients_per_round, SEED, rnd)
    ]  # as ServerLoop.run_round
    tokens = sum(padded_tokens(ex, batch_indices(len(ex), fed.local_steps, fed.batch_size, seed)) for ex, seed in plans)
    with tempfile.TemporaryDirectory() as tmp:
        log = MetricsLog((run_dir := RunDir(Path(tmp))).metrics)
        loop = build_server_loop(session, aggregator, run_dir, log, console, evaluate=False)
        state, hwm_before = session.initial_state, hwm_kib()
        started = time.perf_counter()
        for rnd in range(1, fed.rounds + 1):
            state = loop.run_round(state, rnd)
        elapsed = time.perf_counter() - started
        train = [r for r in log.read() if r.get("split") == "train"]
    done = int(sum(r["steps"] for r in train))
    if done != steps:
        raise RuntimeError(f"federated arm ran {done} optimizer steps, expected {steps}")
    loss = sum(r["loss"] for r in train) / len(train)
    return arm_result(elapsed, done, loss, tokens, hwm_before, session.loaded, data.union_train())


def child_main(arm: str, args: argparse.Namespace) -> None:
    """Run one arm in this (fresh) process and print its result as one JSON line on stdout."""
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    result = {"plain": arm_plain, "central": arm_central, "federated": arm_federated}[arm](build_config(args), args.steps)
    result.update(arm=arm, peak_rss_kib=hwm_kib(), torch_threads=torch.get_num_threads())
    print(json.dumps(result), flush=True)


def run_child(arm: str, argv: list[str]) -> dict[str, Any]:
    """Run ``arm`` in a fresh interpreter with this run's command line; returns its JSON result."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", arm], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads of this machine."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "python": platform.python_version()}


def summarize(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians per arm, the ratios to (a) and the verdict against both goals."""
    arms: dict[str, Any] = {}
    for arm, results in runs.items():
        arms[arm] = {
            "label": ARMS[arm],
            "time_s": statistics.median(r["time_s"] for r in results),
            "times_s": [r["time_s"] for r in results],
            **{k: results[0][k] for k in ("steps", "mean_loss", "padded_tokens")},
            "peak_rss_mib": statistics.median(r["peak_rss_kib"] for r in results) / 1024,
            "rss_before_train_mib": statistics.median(r["hwm_before_train_kib"] for r in results) / 1024,
        }
    for arm in arms.values():
        arm["time_ratio"] = arm["time_s"] / arms["plain"]["time_s"]
        arm["rss_ratio"] = arm["peak_rss_mib"] / arms["plain"]["peak_rss_mib"]
    fed, ref = arms["federated"], runs["plain"][0]
    return {
        "machine": {**machine_info(), "torch_threads": ref["torch_threads"]},
        "settings": {
            "model": args.model,
            "dtype": ref["dtype"],
            "device": ref["device"],
            "steps": args.steps,
            "batch_size": args.batch_size,
            "clients": args.clients,
            "rounds": ROUNDS,
            "local_steps": args.steps // (args.clients * ROUNDS),
            "lr": LR,
            "repeats": args.repeats,
            "max_length": max_length(args),
            "seq_len_mean": round(ref["seq_len_mean"], 1),
            **{k: ref[k] for k in ("num_examples", "seq_len_min", "seq_len_max")},
        },
        "arms": arms,
        "goals": {
            "time_ratio_c_a": fed["time_ratio"],
            "time_goal": TIME_GOAL,
            "time_pass": fed["time_ratio"] <= TIME_GOAL,
            "time_ratio_b_a": arms["central"]["time_ratio"],
            "rss_ratio_c_a": fed["rss_ratio"],
            "rss_goal": RSS_GOAL,
            "rss_pass": fed["rss_ratio"] <= RSS_GOAL,
        },
    }


def markdown(summary: dict[str, Any]) -> str:
    """The results as a markdown section: machine, settings, table per arm, verdicts."""
    m, s, g = summary["machine"], summary["settings"], summary["goals"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads).",
        f"Model `{s['model']}` ({s['dtype']} on {s['device']}); {s['steps']} optimizer steps x batch {s['batch_size']}; "
        f"federated: {s['clients']} clients x {s['rounds']} rounds x {s['local_steps']} local steps; "
        f"{s['num_examples']} training examples, {s['seq_len_mean']} tokens on average "
        f"(min {s['seq_len_min']}, max {s['seq_len_max']}); median of {s['repeats']} run(s).",
        "",
        "| arm | train time (s) | time / (a) | peak RSS (MiB) | RSS / (a) | RSS before training (MiB) | padded tokens | mean loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in summary["arms"].values():
        lines.append(
            f"| {a['label']} | {a['time_s']:.2f} | {a['time_ratio']:.3f} | {a['peak_rss_mib']:.0f} | "
            f"{a['rss_ratio']:.3f} | {a['rss_before_train_mib']:.0f} | {a['padded_tokens']} | {a['mean_loss']:.4f} |"
        )
    lines += [
        "",
        f"- time (c)/(a) = {g['time_ratio_c_a']:.3f} (goal <= {g['time_goal']}): **{'PASS' if g['time_pass'] else 'FAIL'}**; "
        f"(b)/(a) = {g['time_ratio_b_a']:.3f}",
        f"- peak RSS (c)/(a) = {g['rss_ratio_c_a']:.3f} (goal <= {g['rss_goal']}): **{'PASS' if g['rss_pass'] else 'FAIL'}**",
    ]
    return "\n".join(lines)


def write_results_md(path: Path, section: str) -> None:
    """Replace the text between the overhead markers of ``path`` (created with a heading if missing)."""
    block = f"{START}\n## Framework overhead (`benchmarks/overhead.py`)\n\n{section}\n{END}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--child`` is internal: run one arm and print JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias; tiny-random-llama for smoke runs")
    p.add_argument("--steps", type=int, default=64, help="total optimizer steps per arm (a multiple of 2 x clients)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per arm; the median time is reported")
    p.add_argument("--max-train-examples", type=int, default=800)
    p.add_argument("--max-length", type=int, default=None, help="data.max_length (default 96; 256 for the tiny model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every arm (0: all cores)")
    p.add_argument("--write-results", action="store_true", help="also update benchmarks/RESULTS.md")
    p.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= 0 or args.steps % (args.clients * ROUNDS):
        p.error(f"--steps must be a positive multiple of {args.clients * ROUNDS} (clients x {ROUNDS} rounds)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every arm ``--repeats`` times (interleaved), print the table, save JSON (and RESULTS.md)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args)
        return
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        for arm in list(ARMS)[rep % 3 :] + list(ARMS)[: rep % 3]:  # rotate the order: no arm always first
            print(f"repeat {rep + 1}/{args.repeats}: {ARMS[arm]} ...", file=sys.stderr, flush=True)
            runs[arm].append(run_child(arm, argv))
    summary = summarize(runs, args)
    section = markdown(summary)
    print(section)
    (out := HERE / "results" / "overhead.json").parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "runs": runs}, indent=2) + "\n")
    if args.write_results:
        write_results_md(HERE / "RESULTS.md", section)
    print(f"\nwrote {out}" + (" and benchmarks/RESULTS.md" if args.write_results else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
