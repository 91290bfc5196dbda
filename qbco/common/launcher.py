"""Where this process stands under a launcher (torchrun, accelerate launch), read from the environment alone,
so that the command line can ask before anything heavy is imported."""

from __future__ import annotations

import os


def launched_rank(environ=None) -> int:
    """This process's rank as the launcher set it (0 without a launcher); read before any process group."""
    return int((environ if environ is not None else os.environ).get("RANK", "0") or 0)
