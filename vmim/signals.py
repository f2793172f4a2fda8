"""Where a signal stops a run: only where the run waits.

SIGTERM, SIGINT and SIGHUP raise Interrupted in the main thread (vmim.frontend installs
on_signal), which then cleans up as after a failed step. Raised wherever the main thread
happened to be, it landed inside the code that takes and gives back what the run holds: in
Thread.start() of the writeback pusher, after its descriptor of the slot was open and before
the `try` that closes it, the descriptor stayed open, the unmount of the release found the
slot busy, and the slot stayed mounted (the fleet's frozen-worker test, 2026-12-07); inside
subprocess.Popen, the new command ran on, known to nobody.

So a signal is raised only inside `waiting()`: around waiting for a command, a pipeline,
a thread, a lock, a domain, or around reading and copying a stream — code that holds nothing
it would have to give back. Anywhere else it is kept, and raised at the next `waiting()` or
`check()` (between the steps of a run, and in loops that compute without waiting). Once one
was raised the run is ending: the signals that come after are kept and never raised, so that
its clean-up (the release, the unmount) runs to its end. The clean-up after any other
failure is kept from signals too (`kept()`): a job whose lease ran out met the SIGTERM of its
worker in the unmount of the release after that failure, and left the slot mounted.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List

from vmim.errors import Interrupted

__all__ = ["Interrupted", "on_signal", "check", "waiting", "kept", "pending", "reset"]

_waiting = 0
_kept = 0
_pending: List[int] = []
_raised: List[int] = []


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def on_signal(signum: int) -> None:
    """The signal handler's work (main thread): raise now when the main thread waits, else keep
    the signal for the next wait or check."""
    if _waiting and not _kept and not _raised:
        _raise(signum)
    _pending.append(signum)


def _raise(signum: int) -> None:
    _raised.append(signum)
    _pending.clear()
    raise Interrupted(signum)


def check() -> None:
    """Raise the signal that came while the main thread did not wait (no-op in other threads,
    and once one was raised)."""
    if _pending and not _raised and not _kept and _main():
        _raise(_pending[0])


def pending() -> bool:
    """A signal came and was not raised yet."""
    return bool(_pending) and not _raised


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around code that only waits or moves data: a signal is raised in it (and one that came
    before, on entry). In other threads than the main one, nothing changes."""
    global _waiting
    if not _main():
        yield
        return
    check()
    _waiting += 1
    try:
        yield
    finally:
        _waiting -= 1


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Around a clean-up (the release after a failure): no signal is raised in it; one that
    came is raised at the next wait or check after it."""
    global _kept
    if not _main():
        yield
        return
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1


def reset() -> None:
    """A new run (main() called again in one process: tests) starts with no signal."""
    _pending.clear()
    _raised.clear()


def sleep(seconds: float) -> None:
    """time.sleep, where a signal stops the run (a wait in a loop: for a lock, a domain)."""
    import time

    with waiting():
        time.sleep(seconds)
