"""Progress that suits where it is shown: a rich bar on a terminal, plain lines in CI logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def warning(self, text: str) -> None:
        """Always shown (also with --quiet): something the user should change."""
        print(f"warning: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[_Task]:
        if not self.enabled:
            yield _Task(None, None, label, total, quiet=True)
            return
        if self.tty:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), TimeRemainingColumn())
            with RichProgress(*columns, transient=False) as bar:
                yield _Task(bar, bar.add_task(label, total=total), label, total)
        else:
            yield _Task(None, None, label, total)


class _Task:
    def __init__(self, bar, task_id, label: str, total: int, quiet: bool = False):
        self.bar, self.task_id, self.label, self.total, self.quiet = bar, task_id, label, total, quiet
        self.done = 0
        self.start = time.monotonic()
        self._last_print = 0.0

    def advance(self, what: str = "") -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task_id, advance=1, description=f"{self.label} {what}".strip())
            return
        now = time.monotonic()
        # Plain lines: at most one every 2 s, plus the last one, so CI logs stay short.
        if now - self._last_print >= 2.0 or self.done == self.total:
            self._last_print = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.label}: {self.done}/{self.total} {what} ({elapsed:.1f}s, eta {eta:.1f}s)", file=sys.stderr, flush=True)
