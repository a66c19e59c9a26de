"""Markdown tables for the reports: one cell format for every number, cells that cannot break the table."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "–"


def format_value(value: Any) -> str:
    """Format one table cell.

    None → ``"–"``; bools and integers as-is; other reals with 4 significant
    digits (``"{:.4g}"``); mappings/sequences as compact JSON; anything else
    via ``str``. ``|`` and newlines are escaped so the cell cannot break the
    table.

    Args:
        value: Cell value.

    Returns:
        The cell text.
    """
    if value is None:
        text = MISSING
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        f = float(value)
        text = f"{f:.4g}" if math.isfinite(f) else str(f)
    elif isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str, separators=(", ", ": "))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as a GitHub-flavoured markdown table.

    Args:
        rows: One mapping per row; a missing key renders like None (``"–"``).
        columns: Column keys, also used as the header.

    Returns:
        The table (header, separator, one line per row), no trailing newline.

    Raises:
        ValueError: If ``columns`` is empty.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    header = "| " + " | ".join(format_value(str(c)) for c in columns) + " |"
    sep = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([header, sep, *body])
