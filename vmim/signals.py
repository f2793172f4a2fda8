"""Signals that wait while the main thread starts a command.

A signal raises Interrupted in the main thread wherever it is (vmim.frontend): inside
subprocess.Popen, after the fork, the new command was left running and known to nobody — it
went on writing into the slot while the run released it, and the release failed (the fleet's
frozen-worker test, 2026-12-07). While the main thread starts a command (vmim.process.popen)
the signal is deferred (defer_signal), and raised once the command is registered.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List

from vmim.errors import Interrupted

__all__ = ["Interrupted", "defer_signal", "starting"]

_depth = 0
_deferred: List[int] = []


@contextlib.contextmanager
def starting() -> Iterator[List[int]]:
    """Around the start of a command: yields the list that holds, afterwards, the signals
    that came meanwhile (in the main thread only, where the handler raises)."""
    global _depth
    main = threading.current_thread() is threading.main_thread()
    taken: List[int] = []
    if main:
        _depth += 1
    try:
        yield taken
    finally:
        if main:
            _depth -= 1
            if not _depth and _deferred:
                taken.extend(_deferred)
                _deferred.clear()


def defer_signal(signum: int) -> bool:
    """For the signal handler (main thread): True when the main thread is starting a command,
    and the signal is to be raised once it is registered."""
    if _depth:
        _deferred.append(signum)
        return True
    return False
