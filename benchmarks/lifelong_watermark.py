"""Benchmark (issue 18, part 3): the ownership watermark's cost, and its verification and leak tracing before and
after each removal attempt on stolen copies.

Two federated runs of the quickstart (WordNet definitions split by domain): one clean, one with the server's
watermark and per-client copies (`watermark.per_client`). Then, for the watermarked global model and for the copies
of ``--copies`` clients (as if each had leaked its copy): `fedlm watermark verify` (the shared mark) and `trace`
(which client's copy) on the copy as stolen, after fine-tuning it on other data (the held-out WordNet definitions,
the task's own kind of data, AdamW at the run's learning rate) for 50 and then 200 steps in all, after pruning 20%
of each adapter tensor's entries (smallest magnitude), and after merging it into the base (`export --merge`). The
watermark's cost is the relative change of the final global test loss against the clean run.

    PYTHONPATH=src python benchmarks/lifelong_watermark.py                       # SmolLM2-135M (the lead's run)
    PYTHONPATH=src python benchmarks/lifelong_watermark.py --model tiny-random-llama --rounds 1 --copies 1 \\
        --ft-steps 2,4 --size 8 --client-size 6 --out /tmp/wm-bench                  # smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import HERE, cpu_name, publish, read_metrics, run_cli

from fedlm.config.io import load_config
from fedlm.config.schema import DataConfig
from fedlm.data.readers import read_records
from fedlm.models.adapters import load_trainable_state, save_adapter, trainable_state
from fedlm.models.export import export_merged
from fedlm.objectives import build_objective
from fedlm.watermark.removal import fine_tune, prune_state
from fedlm.watermark.suspect import Suspect, open_suspect
from fedlm.watermark.trace import read_registry, trace_model

START, END = "<!-- lifelong-watermark:start -->", "<!-- lifelong-watermark:end -->"
SECRET = "fedlm-benchmark-key"


def runs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The clean and the watermarked run (the same config and seed otherwise)."""
    base = {"model.name": args.model, "federation.rounds": args.rounds, "eval.every": args.rounds, "eval.at_start": False}
    mark: dict[str, Any] = {"watermark.secret": SECRET, "watermark.size": args.size, "watermark.steps": args.wm_steps}
    if not args.shared_only:
        mark.update({"watermark.per_client": True, "watermark.client_size": args.client_size, "watermark.client_steps": args.client_steps})
    if args.wm_lr is not None:
        mark["watermark.lr"] = args.wm_lr
    if args.wm_retain:
        mark["watermark.retain"] = args.wm_retain
    if args.retain_loss != "sft":
        mark["watermark.retain_loss"] = args.retain_loss
    if args.start_steps:
        mark["watermark.start_steps"] = args.start_steps
    if args.until is not None:
        mark["watermark.until"] = args.until
        mark["watermark.check_every"] = args.check_every
    clean, marked = args.out / "clean", args.out / "watermarked"
    run_cli(clean, base)
    run_cli(marked, {**base, **mark})
    return clean, marked


def final_loss(run: Path) -> float:
    """The last global test loss of ``run``."""
    return [r["loss"] for r in read_metrics(run) if r["split"] == "global_test"][-1]


def run_dtype(run: Path) -> str:
    """The dtype the run's model was loaded in (its log's first line: ``model NAME: torch.DTYPE on DEVICE``)."""
    first = (run / "run.log").read_text().splitlines()[0]
    return first.split("torch.", 1)[1].split()[0] if "torch." in first else "unknown dtype"


def embeddings(run: Path) -> list[dict[str, Any]]:
    """Each round's shared embedding (steps taken, trigger accuracy reached) and the clients' copies (mean steps)."""
    rows = []
    for r in read_metrics(run):
        if r.get("split") == "aggregate" and "watermark_steps" in r.get("aggregation", {}):
            a, copies = r["aggregation"], r.get("watermark", {})
            rows.append(
                {
                    "start_steps": a.get("watermark_start_steps"),
                    "start_accuracy": a.get("watermark_start_accuracy"),
                    "round": r["round"],
                    "steps": a["watermark_steps"],
                    "accuracy": a.get("watermark_accuracy"),
                    "client_steps": copies.get("client_steps"),
                }
            )
    return rows


def check(suspect: Suspect, run: Path, clients: list[str], size: int, client_size: int) -> dict[str, Any]:
    """Verification and tracing of the suspect's current weights."""
    started = time.perf_counter()
    result = trace_model(suspect.model, suspect.tokenizer, suspect.device, SECRET, clients, size, client_size)
    return {
        "shared_accuracy": result.shared.accuracy,
        "shared_p": result.shared.p_value,
        "verified": result.shared.present(),
        "leaked": result.leaked,
        "client_accuracy": {c: v.accuracy for c, v in result.clients.items()},
        "seconds": time.perf_counter() - started,
    }


def thief_examples(run: Path, suspect: Suspect) -> list[Any]:
    """The thief's own data: the held-out WordNet definitions, as SFT examples for the suspect's tokenizer."""
    config = load_config(run / "config.yaml")
    records = read_records("embedded:wordnet_defs/test", "data.test")
    data = DataConfig(train="embedded:wordnet_defs", max_length=config.data.max_length, system_prompt=config.data.system_prompt)
    return build_objective("sft").train_examples(records, suspect.tokenizer, data, "the thief", [f"test[{i}]" for i in range(len(records))])


def attack_copy(folder: Path, run: Path, clients: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Verification and tracing of the copy in ``folder`` as stolen and after each removal attempt."""
    sizes = (args.size, args.client_size)
    suspect = open_suspect(folder, trainable=True)
    stolen = trainable_state(suspect.model)
    rows = {"stolen": check(suspect, run, clients, *sizes)}
    examples = thief_examples(run, suspect)
    pad = int(suspect.tokenizer.pad_token_id or 0)
    lr, done = load_config(run / "config.yaml").federation.lr, 0
    for total in args.ft_steps:
        fine_tune(suspect.model, pad, suspect.device, examples, total - done, lr, 8, seed=total)
        done = total
        rows[f"fine-tuned {total} steps"] = check(suspect, run, clients, *sizes)
    load_trainable_state(suspect.model, prune_state(stolen, args.prune))
    rows[f"pruned {args.prune:.0%}"] = check(suspect, run, clients, *sizes)
    load_trainable_state(suspect.model, stolen)
    with tempfile.TemporaryDirectory(prefix="wm-merge-") as tmp:  # the copy as a run folder, merged by export --merge
        fake = Path(tmp) / "run"
        (fake / "adapter").mkdir(parents=True)
        shutil.copy(run / "config.yaml", fake / "config.yaml")
        save_adapter(suspect.model, stolen, fake / "adapter")
        merged = export_merged(fake, Path(tmp) / "merged", load_config(fake / "config.yaml"))
        rows["merged (export --merge)"] = check(open_suspect(merged), run, clients, *sizes)
    return rows


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """The RESULTS.md block."""
    cost = summary["loss_cost"]
    lines = [
        f"Model `{args.model}`, {summary.get('dtype', 'float32')} on {summary.get('cpu', 'CPU')}; quickstart config, {args.rounds} rounds; "
        f"watermark: {args.size} shared triggers, {args.wm_steps} server steps per round at lr {args.wm_lr or 'of the federation'} "
        f"({args.wm_retain} retain conversations, {args.retain_loss}; {args.start_steps} pre-training steps before round 1), "
        + (
            "no per-client copies (the stolen model is the global one)"
            if args.shared_only
            else f"per-client sets of {args.client_size} ({args.client_steps} steps per copy)"
        )
        + (
            f"; embeddings stop at trigger accuracy {args.until} (checked every {args.check_every} steps, the steps above the most)"
            if args.until
            else ""
        )
        + "; K = 10 answers (chance 0.1); "
        + (
            f"verified / traced at p < 1e-3 (trace: Bonferroni over {len(summary['clients'])} clients)."
            if summary["clients"]
            else "verified at p < 1e-3."
        ),
        "",
        f"Clean test loss {summary['clean_loss']:.4f}, watermarked {summary['watermarked_loss']:.4f}: cost {cost:+.2%} (goal <= 1%).",
        "",
        "".join(
            f"Pre-training: {e['start_steps']:.0f} steps (acc. {e['start_accuracy'] or 0:.2f}). "
            for e in summary.get("embeddings", [])
            if e.get("start_steps")
        )
        + "Steps each round's embedding took (shared mark; mean over the clients' copies): "
        + "; ".join(
            f"round {e['round']}: {e['steps']:.0f}"
            + (f" (acc. {e['accuracy']:.2f})" if e["accuracy"] is not None else "")
            + (f", copies {e['client_steps']:.0f}" if e["client_steps"] is not None else "")
            for e in summary.get("embeddings", [])
        )
        + ".",
        "",
        "| model | attack | shared trigger acc. | p-value | verified |" + (" traced as | traced right |" if summary["clients"] else ""),
        "| --- | --- | ---: | ---: | :---: |" + (" --- | :---: |" if summary["clients"] else ""),
    ]
    for who, rows in summary["copies"].items():
        for attack, row in rows.items():
            expected = None if who == "global" else who
            traced = f" {row['leaked'] or 'nobody'} | {'yes' if row['leaked'] == expected else 'no'} |" if summary["clients"] else ""
            lines.append(
                f"| {who} | {attack} | {row['shared_accuracy']:.3f} | {row['shared_p']:.2g} | {'yes' if row['verified'] else 'no'} |" + traced
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; default: ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--copies", type=int, default=2, help="clients whose copies are stolen and attacked")
    parser.add_argument("--ft-steps", type=lambda s: [int(x) for x in s.split(",")], default=[50, 200])
    parser.add_argument("--prune", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--client-size", type=int, default=32)
    parser.add_argument("--wm-steps", type=int, default=10)
    parser.add_argument("--client-steps", type=int, default=10)
    parser.add_argument("--wm-lr", type=float, default=None)
    parser.add_argument("--wm-retain", type=int, default=0, help="watermark.retain: conversations the model writes itself per embedding")
    parser.add_argument("--retain-loss", choices=["sft", "kl"], default="sft", help="watermark.retain_loss")
    parser.add_argument("--shared-only", action="store_true", help="no per-client copies: attack the global model, verify only")
    parser.add_argument("--start-steps", type=int, default=0, help="watermark.start_steps: pre-training of the initial model")
    parser.add_argument("--until", type=float, default=None, help="watermark.until: stop each embedding at this trigger accuracy")
    parser.add_argument("--check-every", type=int, default=5, help="watermark.check_every (with --until)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifelong_watermark")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--publish-only", action="store_true", help="rewrite the tables from --out's summary.json, computing nothing")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.publish_only:
        summary = json.loads((args.out / "summary.json").read_text())
        write_block(summary, args)
        return
    torch.manual_seed(0)
    clean, marked = runs(args)
    if args.shared_only:  # every client holds the global model: the thief attacks it, there is no copy to trace
        clients: list[str] = []
        copies = {"global": attack_copy(marked, marked, clients, args)}
    else:
        clients = read_registry(marked)["clients"]
        copies = {"global": {"as trained": check(open_suspect(marked), marked, clients, args.size, args.client_size)}}
        for client in clients[: args.copies]:
            copies[client] = attack_copy(marked / "watermark" / client, marked, clients, args)
    clean_loss, marked_loss = final_loss(clean), final_loss(marked)
    summary = {
        "clean_loss": clean_loss,
        "watermarked_loss": marked_loss,
        "loss_cost": marked_loss / clean_loss - 1,
        "dtype": run_dtype(marked),
        "cpu": cpu_name(),
        "clients": clients,
        "embeddings": embeddings(marked),
        "copies": copies,
    }
    write_block(summary, args)


def write_block(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """``summary`` and its table into ``--out`` (and RESULTS.md with ``--write-results``), in the block of its kind."""
    if args.shared_only:  # its own block: the shared mark alone, attacked on the global model
        start, end = START.replace("watermark:", "watermark-shared:"), END.replace("watermark:", "watermark-shared:")
        publish(
            args.out,
            summary,
            markdown(summary, args),
            args.write_results,
            start,
            end,
            "Lifelong: the shared watermark alone, attacked on the global model",
        )
    else:
        publish(args.out, summary, markdown(summary, args), args.write_results, START, END, "Lifelong: model ownership (watermark and leak tracing)")


if __name__ == "__main__":
    main()
