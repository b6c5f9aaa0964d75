"""What ``calibrate`` and ``build`` report while they work: log lines, and phases of known length.

The library reports to a :class:`Progress`; the default one is silent. The CLI's shows each phase
as a progress bar with the time left (click's, already a dependency) and logs lines above it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


class Progress:
    """Silent: the base every reporter extends."""

    def log(self, line: str) -> None:
        """One line about what was just done (a candidate's score, a choice)."""

    @contextlib.contextmanager
    def phase(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        """A phase of ``total`` steps; call the yielded function after each step."""
        yield lambda: None


class ConsoleProgress(Progress):
    """Progress bars and log lines on stderr (``quiet``: nothing at all)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar: Any = None

    def log(self, line: str) -> None:
        if self.quiet:
            return
        import click

        if self._bar is not None and sys.stderr.isatty():
            line = "\r\033[K" + line  # over the bar's line; the bar redraws below on its next step
        click.echo(line, err=True)
        if self._bar is not None and sys.stderr.isatty():
            self._bar.render_progress()

    @contextlib.contextmanager
    def phase(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        if self.quiet:
            yield lambda: None
            return
        import click

        with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True) as bar:
            self._bar = bar
            try:
                yield lambda: bar.update(1)
            finally:
                self._bar = None
