"""Progress of the long waits outside the training steps (the reference pass, the held-out evaluation, the
scoring of `qbco eval`) on the rich Progress the CLI makes; with no Progress (--quiet, tests) nothing shows."""

from __future__ import annotations


class Wait:
    """Rows done of one wait, on a progress task of its own that is added when the wait starts.

    The task is moved with `completed=` (rows done so far), never `advance=`: a progress sink that counts
    the training bar's advances (tests/test_reliability.py's SignalAt stops a run after N of them) still
    counts training steps only.
    """

    def __init__(self, progress, description: str, total: int):
        self.progress, self.description, self.total, self.task = progress, description, total, None

    def __call__(self, done: int, **fields) -> None:
        """`fields`: figures the bar shows beside the count (tps: tokens per second)."""
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=self.total)
        self.progress.update(self.task, completed=done, **fields)

    def after(self, offset: int):
        """The same task counted on from `offset` rows: a second pass that belongs to the same wait."""
        return lambda done, **fields: self(offset + done, **fields)
