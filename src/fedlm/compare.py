"""``fedlm compare``: base model, local-only clients, centralized and federated training on equal budgets.

(a) base: the starting model (exactly the base model for LoRA/DoRA with B = 0 and IA3 with unit scales; prompt and
    prefix tuning start with their seeded soft tokens; a run with ``model.init_adapter`` starts from that adapter);
(b) local-only: each client trains alone for as many optimizer steps as it trains in the federation;
(c) centralized: one trainer on the union of the clients' data for the federation's total number of steps;
(d) federated: the configured federation (a full run directory under ``federated/``).
All four are scored by the same evaluator on the same global test set and client test shares. The output folder
holds ``comparison.md`` / ``comparison.json`` (the tables, naming the model, dtype and test set), ``report.md`` and
``plots/comparison.png`` (the four side by side), ``compare.log``, and the federated run in ``federated/``.
"""

from __future__ import annotations

import json
from typing import Any

from fedlm.config.schema import ExperimentConfig
from fedlm.core.errors import FedlmError
from fedlm.core.sampling import sample_clients
from fedlm.core.seeding import derive_seed
from fedlm.core.task import LocalPlan
from fedlm.core.update import TensorDict
from fedlm.evaluation.evaluator import GLOBAL_SPLIT
from fedlm.evaluation.text_metrics import rouge_l
from fedlm.experiment import Session, build_session, run_federated
from fedlm.federation.schedule import lr_at
from fedlm.reporting.comparison_plot import plot_comparison
from fedlm.reporting.metrics_log import MetricsLog
from fedlm.reporting.personalization import PERSONAL_SPLIT, best_per_client, personal_rows
from fedlm.reporting.progress import Progress, RunConsole
from fedlm.reporting.report import markdown_table
from fedlm.reporting.run_dir import RunDir, prepare_run_dir
from fedlm.reporting.side_by_side import side_by_side_markdown

METRICS = ("loss", "perplexity", "rouge_l", "exact_match", "mc_accuracy")
SHOWN_EXAMPLES = 5  # held-out questions printed with the base, local-only and federated answers side by side


def local_step_counts(config: ExperimentConfig, client_names: list[str]) -> dict[str, int]:
    """Optimizer steps each client takes in the federation: rounds it is sampled in x local_steps."""
    counts = dict.fromkeys(client_names, 0)
    for round_num in range(1, config.federation.rounds + 1):
        for client in sample_clients(client_names, config.federation.clients_per_round, config.seed, round_num):
            counts[client] += config.federation.local_steps
    return counts


def train_alone(session: Session, name: str, examples: list, steps: int, progress: Progress) -> TensorDict:
    """Train one model from the starting adapter on ``examples`` for ``steps`` steps (the same lr schedule)."""
    fed = session.config.federation
    lrs = [lr_at(s / steps, base_lr=fed.lr, schedule=fed.lr_schedule, min_lr_ratio=fed.min_lr_ratio) for s in range(steps)]
    plan = LocalPlan(round=1, lrs=lrs, batch_size=fed.batch_size, seed=derive_seed(session.config.seed, "baseline", name))
    task = progress.task(f"train {name}", steps)
    update = session.trainer().train(name, examples, session.initial_state, plan, task.advance)
    task.done()
    return {k: session.initial_state[k] + update.tensors[k] for k in update.tensors}


def run_compare(config: ExperimentConfig, overwrite: bool) -> dict[str, Any]:
    """Run the four arms into ``output_dir`` and write ``comparison.md`` and ``comparison.json`` there."""
    if config.continual is not None:
        raise FedlmError(
            "`fedlm compare` trains its centralized and local baselines on all data at once, not as a `continual` stream; "
            "run the stream with `fedlm run` (its report has the accuracy matrix), or remove `continual`"
        )
    target = prepare_run_dir(config.output_dir, resume=False, overwrite=overwrite)
    console = RunConsole()
    session = build_session(config, console)
    target.create()
    root = target.root
    console.attach(root / "compare.log")
    arms: dict[str, list[dict[str, Any]]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}  # each arm's prediction rows, for the side-by-side examples
    with Progress(console) as progress:
        evaluator = session.evaluator(progress)
        result = evaluator.evaluate(session.initial_state, 0, "base")
        arms["base"], answers["base"] = result.records, result.predictions
        console.print(f"base: {_global(arms['base'])}")
        counts = local_step_counts(config, session.data.client_names)
        for client, steps in counts.items():
            if steps == 0:
                continue
            state = train_alone(session, f"local-{client}", session.data.client_train[client], steps, progress)
            result = evaluator.evaluate(state, 0, f"local-only {client}")
            arms[f"local:{client}"], answers[client] = result.records, result.predictions
            console.print(f"local-only {client} ({steps} steps): {_global(arms[f'local:{client}'])}")
        total = sum(counts.values())
        state = train_alone(session, "centralized", session.data.union_train(), total, progress)
        arms["centralized"] = evaluator.evaluate(state, 0, "centralized").records
        console.print(f"centralized ({total} steps): {_global(arms['centralized'])}")
    fed_dir = RunDir(root / "federated")
    fed_dir.root.mkdir(parents=True, exist_ok=True)
    run_federated(session, fed_dir, resume=False, console=console)
    last = config.federation.rounds
    arms["federated"] = [r for r in MetricsLog(fed_dir.metrics).read() if r["round"] == last and r["split"].endswith("_test")]
    summary = summarize(arms, session.data.client_names)
    personal = [r for r in MetricsLog(fed_dir.metrics).read() if r.get("split") == PERSONAL_SPLIT]  # personalization.method
    if personal:
        summary["personalization"] = {"per_model": personal_rows(personal), "best": best_per_client(personal)}
    summary["setting"] = setting(session)
    fed_rows = [json.loads(line) for line in (fed_dir.predictions / f"round_{last:04d}.jsonl").read_text().splitlines()]
    examples = side_by_side_markdown(
        {"base": answers.pop("base"), "federated": fed_rows}, answers, SHOWN_EXAMPLES, derive_seed(config.seed, "shown-examples"), rouge_l
    )
    if examples is not None:
        summary["examples_markdown"] = examples
    (root / "comparison.json").write_text(json.dumps(summary, indent=1))
    (root / "comparison.md").write_text(comparison_markdown(summary))
    plot = plot_comparison(summary["global_test"], summary["local_only_global_test"], METRICS, root / "plots" / "comparison.png")
    (root / "report.md").write_text(comparison_report(summary, plot is not None))
    console.print_markdown(comparison_markdown(summary))
    console.print(
        f"[green]done[/green]: {root}/comparison.md (these tables), comparison.json, report.md with plots/comparison.png; "
        f"the federated run (metrics, adapter, its own report) in {fed_dir.root}/"
    )
    return summary


def setting(session: Session) -> dict[str, Any]:
    """What the comparison ran on: the model, its dtype and device, and the test set."""
    c = session.config
    if c.data.test is not None:
        source = c.data.test
    elif c.data.train.startswith("embedded:") and "/" not in c.data.train:
        source = f"{c.data.train}/test"
    else:
        source = f"a seeded {c.data.test_fraction:.0%} split of {c.data.train}"
    shares = len({ex.client for ex in session.data.test if ex.client is not None})
    sample = f", a seeded sample of {c.eval.max_examples}" if c.eval.max_examples is not None else ""
    return {
        "model": c.model.name,
        "dtype": str(session.loaded.dtype).removeprefix("torch."),
        "device": str(session.loaded.device),
        "test_set": f"{source} ({sum(1 for ex in session.data.test if ex.in_global)} examples{sample}; {shares} client shares)",
        "objective": c.objective.name,
    }


def summarize(arms: dict[str, list[dict[str, Any]]], clients: list[str]) -> dict[str, Any]:
    """Global-test metrics per arm (local-only also as the mean over clients) and each client's test share."""
    rows = {name: _by_split(records) for name, records in arms.items()}
    local = [name for name in rows if name.startswith("local:")]
    global_rows = []
    for name in ("base", "centralized", "federated"):
        global_rows.append({"method": name, **{m: rows[name][GLOBAL_SPLIT].get(m) for m in METRICS}})
    if local:
        mean = {m: _mean([rows[n][GLOBAL_SPLIT].get(m) for n in local]) for m in METRICS}
        global_rows.insert(1, {"method": "local-only (mean)", **mean})
    metric = "rouge_l" if rows["base"][GLOBAL_SPLIT].get("rouge_l") is not None else "loss"
    per_client = []
    for client in clients:
        split = f"client_{client}_test"
        row: dict[str, Any] = {"client": client}
        for name in ("base", "centralized", "federated", f"local:{client}"):
            key = "local-only" if name.startswith("local:") else name
            row[key] = rows.get(name, {}).get(split, {}).get(metric)
        per_client.append(row)
    local_global = {n.removeprefix("local:"): {m: rows[n][GLOBAL_SPLIT].get(m) for m in METRICS} for n in local}
    return {"global_test": global_rows, "per_client_metric": metric, "per_client": per_client, "local_only_global_test": local_global}


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The comparison tables in markdown, after the model, dtype and test set they were measured on."""
    per_metric = summary["per_client_metric"]
    s = summary.get("setting") or {}
    head = f"Model {s.get('model')} ({s.get('dtype')} on {s.get('device')}); test set {s.get('test_set')}.\n\n" if s else ""
    metrics = [m for m in METRICS if any(row.get(m) is not None for row in summary["global_test"])]
    return (
        head
        + "## Global test set\n\n"
        + markdown_table(summary["global_test"], ["method", *metrics])
        + f"\n\n## Each client's test share ({per_metric})\n\n"
        + markdown_table(summary["per_client"], ["client", "base", "local-only", "centralized", "federated"])
        + "\n"
        + _personal_markdown(summary.get("personalization"))
        + (
            f"\n## {SHOWN_EXAMPLES} held-out questions (seeded; the federated model's gains first)\n\n{summary['examples_markdown']}\n"
            if summary.get("examples_markdown")
            else ""
        )
    )


def _personal_markdown(personal: dict[str, Any] | None) -> str:
    """The federated arm's personal models on each client's own and the others' shares (``personalization``)."""
    if not personal:
        return ""
    columns = ["client", "model", "own loss", "others loss", "own vs global", "others vs global"]
    wins = sum(1 for b in personal["best"] if b["wins"])
    return (
        "\n## Personalization (federated arm): own share vs the other clients' shares (loss)\n\n"
        + markdown_table(personal["per_model"], columns)
        + f"\n\nThe best personal or mixed model beats the global one on its own share for {wins} of {len(personal['best'])} clients.\n"
    )


def comparison_report(summary: dict[str, Any], with_plot: bool) -> str:
    """``report.md`` of a comparison: the tables, the side-by-side plot and where the federated run's own report is."""
    plot = "![base vs local-only vs centralized vs federated](plots/comparison.png)\n\n" if with_plot else ""
    return (
        "# fedlm compare\n\n"
        + comparison_markdown(summary)
        + "\n"
        + plot
        + "The federated run's own report (per round, per client, its plots): [federated/report.md](federated/report.md).\n"
    )


def _by_split(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["split"]: r for r in records}


def _global(records: list[dict[str, Any]]) -> str:
    glob = _by_split(records)[GLOBAL_SPLIT]
    return ", ".join(f"{m} {glob[m]:.4f}" for m in METRICS if glob.get(m) is not None)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
