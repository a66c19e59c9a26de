"""``fedlm data partition``: the clients' sizes and field mix, as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fedlm.config.schema import ExperimentConfig
from fedlm.data.partition import describe_partition
from fedlm.data.prepare import load_split_records, split_among_clients


def print_partition(config: ExperimentConfig, console: Console | None = None) -> list[dict]:
    """Partition the training records as a run would (no model needed) and print one row per client."""
    console = console or Console()
    train, test = load_split_records(config.data, config.seed)
    partition = split_among_clients(train, config.partition, config.seed)
    field = config.partition.field if config.partition.field and config.partition.field in train[0] else None
    rows = describe_partition(partition, train, field)
    table = Table(title=f"{config.partition.method} partition of {config.data.train} ({len(train)} train, {len(test)} test)")
    table.add_column("client")
    table.add_column("examples", justify="right")
    table.add_column(f"{field} mix" if field else "mix")
    for row in rows:
        mix = ", ".join(f"{k}: {v}" for k, v in row["mix"].items() if v)
        table.add_row(str(row["client"]), str(row["size"]), mix)
    console.print(table)
    return rows
