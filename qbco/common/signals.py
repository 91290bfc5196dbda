"""SIGTERM handled as Ctrl-C is: `kill PID`, a scheduler's stop or a container's shutdown raises KeyboardInterrupt
in the main thread, so every command stops the way it does on Ctrl-C (writes are atomic: nothing half-written
under an output's name, a temporary folder removed) instead of ending at once. The training loop installs its own
handler for both signals over this one (qbco/train/loop.py, StopSignals: finish the step, write a checkpoint)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread was: a KeyboardInterrupt, so every Ctrl-C path takes it."""


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


@contextmanager
def interrupt_on_term():
    """Within the block, SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread; the handler before
    it is put back after. Off the main thread (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
