"""Rich progress bars for training and evaluation, and a console whose every line is also saved to ``run.log``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class RunConsole:
    """Prints to the terminal (rich markup) and appends the plain text to a log file."""

    def __init__(self, log_path: Path | None = None, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet)
        self.log_path = log_path
        self._pending: list[str] = []

    def print(self, message: str) -> None:
        """Show ``message`` and save it (held back until a log file is attached)."""
        self.console.print(message)
        self._pending.append(Console(width=200).render_str(message).plain)
        self._flush()

    def print_markdown(self, text: str) -> None:
        """Show markdown ``text`` rendered (its tables drawn to the terminal's width) and save it as markdown."""
        self.console.print(Markdown(text))
        self._pending.append(text)
        self._flush()

    def attach(self, log_path: Path) -> None:
        """Start saving to ``log_path``, including every line printed before."""
        self.log_path = log_path
        self._flush()

    def _flush(self) -> None:
        if self.log_path is None or not self._pending:
            return
        with self.log_path.open("a") as handle:
            handle.write("".join(line + "\n" for line in self._pending))
        self._pending.clear()


@dataclass
class ProgressTask:
    """One bar: ``advance`` by units of work (steps, examples)."""

    bars: RichProgress
    task_id: TaskID

    def advance(self, amount: int = 1) -> None:
        """Move the bar forward."""
        self.bars.advance(self.task_id, amount)

    def done(self) -> None:
        """Remove the finished bar."""
        self.bars.remove_task(self.task_id)


class Progress:
    """A context manager holding the live progress bars of a run."""

    def __init__(self, console: RunConsole) -> None:
        self.bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console.console,
            transient=True,
        )

    def __enter__(self) -> Progress:
        self.bars.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bars.stop()

    def task(self, description: str, total: int) -> ProgressTask:
        """A new bar of ``total`` units."""
        return ProgressTask(self.bars, self.bars.add_task(description, total=total))
