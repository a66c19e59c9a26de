"""The ``fedlm`` command line: run, compare, and data tools. Errors print one line; ``--debug`` shows tracebacks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

from fedlm.cli.contribution import register as register_contribution
from fedlm.cli.flower import flower_app
from fedlm.cli.guard import guarded
from fedlm.cli.inference import register as register_inference
from fedlm.cli.privacy import privacy_app
from fedlm.cli.watermark import watermark_app
from fedlm.core.errors import FedlmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated training of large language models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data and partitions.")
app.add_typer(data_app, name="data")
app.add_typer(privacy_app, name="privacy")
app.add_typer(flower_app, name="flower")
app.add_typer(watermark_app, name="watermark")
register_inference(app)  # generate, chat, serve
register_contribution(app)  # contribution RUN_DIR

ConfigArg = Annotated[Path | None, typer.Argument(help="experiment YAML (default: the embedded quickstart defaults)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value (repeatable)")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]


@app.command()
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in output_dir from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output_dir")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a federated experiment; results go to the config's `output_dir`."""

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.experiment import build_session, run_federated
        from fedlm.reporting.progress import RunConsole
        from fedlm.reporting.run_dir import prepare_run_dir

        cfg = load_config(config, set_ or [])
        if cfg.federation.runtime == "flower":
            raise FedlmError(
                "`federation.runtime: flower` runs on a Flower SuperLink, not in `fedlm run`: start `fedlm flower superlink`, "
                "one `fedlm flower supernode CONFIG --partition-id K` per client, then `fedlm flower run CONFIG` "
                "(or --set federation.runtime=simulation to run in-process)"
            )
        if cfg.federation.runtime == "flower-simulation":  # the Flower apps on Flower's simulation engine (Ray)
            from fedlm.runtime.flower.simulation_engine import run_on_simulation_engine

            run_on_simulation_engine(cfg, resume=resume, overwrite=overwrite)
            return
        run_dir = prepare_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite)
        console = RunConsole()
        session = build_session(cfg, console)
        run_dir.create()
        console.attach(run_dir.log)
        run_federated(session, run_dir, resume, console)
        console.print(f"[green]done[/green]: {run_dir.root} (report.md, metrics.jsonl, adapter/)")

    guarded(debug, action)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    client: Annotated[
        str | None, typer.Option("--client", help="members from this client's data (default: every client's); its saved local model is audited too")
    ] = None,
    max_examples: Annotated[
        int | None, typer.Option("--max-examples", min=2, help="members and non-members each (default: eval.audit.max_examples, or 200)")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Membership inference (loss, zlib, Min-K%) and canary exposure against a run's global model and a saved client
    model; writes RUN_DIR/audit.json (and report.md with it)."""

    def action() -> None:
        from fedlm.cli.audit import audit_run
        from fedlm.reporting.progress import RunConsole

        console = RunConsole()
        report = audit_run(run_dir, client, max_examples, console)
        console.print(f"[green]done[/green]: {run_dir}/audit.json ({report['examples_per_set']} members vs non-members)")

    guarded(debug, action)


@app.command()
def compare(
    config: ConfigArg = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
    debug: DebugOpt = False,
) -> None:
    """Compare base model, local-only clients, centralized and federated training on the same budget."""

    def action() -> None:
        from fedlm.compare import run_compare
        from fedlm.config.io import load_config

        cfg = load_config(config, set_ or [])
        run_compare(cfg, overwrite=overwrite)

    guarded(debug, action)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder (with --model-name: any folder for the results)")],
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated lm-eval tasks, e.g. wordnet_mc,arc_easy,mmlu")],
    client: Annotated[str | None, typer.Option("--client", help="evaluate this client's personal model (RUN_DIR/clients/NAME/adapter)")] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            "--mix",
            help="global | local | adapter | logits: the inference phase's mix of the client's personal model and the global one (weight from the run's `inference` section)",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="only the first N documents of each task (quick checks)")] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option("--include-path", help="a folder of your own lm-eval task YAMLs + local data (repeatable)")
    ] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="evaluate this base model without an adapter (the 'base' row)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="documents per forward pass")] = 8,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="few-shot examples (default: each task's own)")] = None,
    allow_code_execution: Annotated[
        bool, typer.Option("--allow-code-execution", help="let code tasks (humaneval, mbpp) run the model's generated code here")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Standard benchmarks (EleutherAI lm-evaluation-harness) on a run's global model, a client's personal model or a
    base model; writes RUN_DIR/eval/<task>.json and a table in RUN_DIR/report.md."""

    def action() -> None:
        from fedlm.cli.harness_eval import EvalRequest, evaluate_request, split_tasks
        from fedlm.reporting.progress import RunConsole

        request = EvalRequest(
            run_dir,
            split_tasks(tasks),
            client,
            mix,
            limit,
            tuple(str(p) for p in include_path or []),
            model_name,
            batch_size,
            num_fewshot,
            allow_code_execution,
        )
        console = RunConsole()
        outcomes = evaluate_request(request, console)
        failed = [o.task for o in outcomes if o.error is not None]
        console.print(f"[green]done[/green]: {run_dir}/eval/ ({len(outcomes) - len(failed)} tasks) and {run_dir}/report.md")
        if failed:
            raise FedlmError(f"{len(failed)} task(s) failed: {', '.join(failed)} (the others are saved; see the errors above)")

    guarded(debug, action)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    out_dir: Annotated[Path, typer.Argument(help="where the merged model folder goes (new or empty)")],
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter into the base weights (lora, dora, ia3)")] = False,
    debug: DebugOpt = False,
) -> None:
    """Export a run's model: with --merge, base weights + adapter as one Hugging Face folder (usable as `model.name`)."""

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.models.export import export_merged, finished_run_config

        if not merge:
            raise FedlmError("`fedlm export` needs --merge (the only export so far); RUN_DIR/adapter is already a peft adapter")
        config = load_config(finished_run_config(run_dir))
        typer.echo(f"merged model: {export_merged(run_dir, out_dir, config)}")

    guarded(debug, action)


@data_app.command("partition")
def data_partition(config: ConfigArg = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Print each client's training-set size and field mix under the config's partition."""

    def action() -> None:
        from fedlm.config.io import load_config
        from fedlm.data.describe import print_partition

        print_partition(load_config(config, set_ or []))

    guarded(debug, action)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    app(prog_name="fedlm")


if __name__ == "__main__":
    main()
