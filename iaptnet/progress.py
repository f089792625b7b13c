"""Live progress on a terminal while long work runs (synthesis, studies, rounds), with rich.

Progress goes to stderr and only when stdout is a terminal and the user did not ask for
`--quiet` or `--json`: piped or scripted output carries results only. Each stage leaves one
line behind (what ran, how long it took); the current one shows as a spinner with the round
and how many nodes have answered.
"""

from __future__ import annotations

import sys
import time


class LiveProgress:
    """`with LiveProgress(enabled) as live:` then `live.stage(text)`, `live.round(...)`; a
    disabled one does nothing, so callers never branch on it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._status = None
        self._console = None
        self._stage = None
        self._started = 0.0

    @classmethod
    def for_terminal(cls, *, quiet: bool = False) -> LiveProgress:
        return cls(not quiet and sys.stdout.isatty())

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            from rich.console import Console

            self._console = Console(stderr=True)
            self._status = self._console.status("starting")
            self._status.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish_stage(failed=exc[0] is not None)
        if self._status:
            self._status.stop()

    def stage(self, text: str) -> None:
        """A new stage begins (the one before it is done)."""
        if not self.enabled:
            return
        self._finish_stage()
        self._stage, self._started = text, time.perf_counter()
        self._status.update(text)

    def round(self, kind: str, round_no: int, answered: int, expected: int) -> None:
        """The session's progress callback: a round's answers as they arrive."""
        if self.enabled:
            prefix = f"{self._stage}: " if self._stage else ""
            self._status.update(f"{prefix}round {round_no} ({kind}), {answered}/{expected} nodes answered")

    def update(self, text: str) -> None:
        if self.enabled:
            self._status.update(text)

    def _finish_stage(self, failed: bool = False) -> None:
        if self.enabled and self._stage:
            mark = "[red]✗[/red]" if failed else "[green]✓[/green]"
            self._console.print(f"{mark} {self._stage} [dim]({time.perf_counter() - self._started:.1f} s)[/dim]")
        self._stage = None
