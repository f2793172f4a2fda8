"""A progress line for store and restore on a terminal: bytes done of the estimated total,
rate, time left. Read from /proc/PID/io of the process that reads the data, so it costs the
transfer nothing. Never shown when stderr is not a terminal (cron, Jenkins) or with --json."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional

from vmim import terminal

_local = threading.local()
enabled = False  # set by the command line: a terminal, one box, no --json, no -q

INTERVAL = 0.5


def human_size(n: float) -> str:
    """Bytes for people: 734.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _rchar(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> List[int]:
    """pid's children, grandchildren...: a sandboxed command (vmim.sandbox) reads in the
    program bwrap started, not in bwrap."""
    parents: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    found: List[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def read_bytes(pid: int) -> Optional[int]:
    """What the process pid and its descendants have read so far."""
    own = _rchar(pid)
    if own is None:
        return None
    return own + sum(filter(None, map(_rchar, _descendants(pid))))


class _Watcher(threading.Thread):
    def __init__(self, label: str, total: int):
        super().__init__(daemon=True)
        self.label = label
        self.total = max(total, 1)
        self.pid: Optional[int] = None
        self.stop = threading.Event()
        self.shown = False

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(INTERVAL):
            if self.pid is None:
                continue
            done = read_bytes(self.pid)
            if done is None:
                continue
            elapsed = max(time.monotonic() - started, 1e-3)
            rate = done / elapsed
            left = (self.total - done) / rate if rate > 0 and done < self.total else 0
            line = (f"{self.label}: {human_size(done)} of {human_size(self.total)}, "
                    f"{human_size(rate)}/s, {left:.0f} s left")
            err = terminal.unescaped(sys.stderr)  # the carriage return is meant; the label is text
            err.write("\r" + terminal.safe(line[:120]).ljust(80))
            err.flush()
            self.shown = True

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.shown:
            err = terminal.unescaped(sys.stderr)
            err.write("\r" + " " * 80 + "\r")
            err.flush()


@contextlib.contextmanager
def watch(label: str, total: int) -> Iterator[None]:
    """Show progress of the next command this thread starts (its first stage)."""
    if not enabled:
        yield
        return
    w = _Watcher(label, total)
    _local.watcher = w
    w.start()
    try:
        yield
    finally:
        _local.watcher = None
        w.finish()


def started(pid: int) -> None:
    """Called by the process helpers for each command they start."""
    w = getattr(_local, "watcher", None)
    if w is not None and w.pid is None:
        w.pid = pid
