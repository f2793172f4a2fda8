"""How the stages of a pipeline end (vmim.process.pipeline): which one is blamed when one
fails, and what they said on their way when all succeeded."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from typing import IO, Any, Callable, Iterator, List, Optional, Sequence, Tuple

from vmim import errors, hashcopy

log = logging.getLogger("vmim.process")

_box = threading.local()  # the box this thread runs for (boxes run in threads with -j)


@contextlib.contextmanager
def box_context(name: str) -> Iterator[None]:
    """What a command says on its way to success is logged under box `name` meanwhile."""
    before = getattr(_box, "name", None)
    _box.name = name
    try:
        yield
    finally:
        _box.name = before


def broken_pipe(code: int) -> bool:
    return code in (-signal.SIGPIPE, 128 + signal.SIGPIPE)


#: how long stages before a failed one may take to end on their own (see wait_stages)
BLAME_GRACE = 0.5


def wait_stages(procs: Sequence[subprocess.Popen],
                stop: Callable[[subprocess.Popen], None]) -> Optional[int]:
    """Wait for every stage of a pipeline; return the index of the stage to blame, or None.

    The first stage that fails on its own (not of SIGPIPE because a later one died) is blamed
    and the others are stopped: a stage waiting for input that a failed stage's forked helper
    still holds open would otherwise wait for that helper. Stages before the failed one get
    BLAME_GRACE seconds to end first: a decompressor that closes its output and then reports
    the damage it found has a reader that fails of the short input a moment before it."""
    with _ExitWatch(procs) as watch:
        while True:
            codes = [p.poll() for p in procs]
            culprit = next((i for i, c in enumerate(codes) if c not in (None, 0) and
                            not broken_pipe(c)), None)
            if culprit is not None:
                deadline = time.monotonic() + BLAME_GRACE
                while (any(p.poll() is None for p in procs[:culprit])
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
                codes = [p.poll() for p in procs]
                culprit = next(i for i, c in enumerate(codes) if c not in (None, 0) and
                               not broken_pipe(c))
                for p in procs:
                    stop(p)
                return culprit
            if None not in codes:
                return next((i for i, c in enumerate(codes) if c != 0), None)
            watch.wait()


class _ExitWatch:
    """Waits until a stage may have ended: on the stages' pidfds (Linux 5.3: woken the moment
    one ends), else by polling with a growing delay (up to 50 ms: on average 25 ms of every
    pipeline's end lost, measured 2026-12-07). A pidfd of a child not yet reaped (poll())
    cannot name another process."""

    def __init__(self, procs: Sequence[subprocess.Popen]) -> None:
        self.procs = procs
        self.fds: dict = {}
        self.delay = 0.001

    def __enter__(self) -> _ExitWatch:
        try:
            for p in self.procs:
                if p.returncode is None:
                    self.fds[p] = os.pidfd_open(p.pid)
        except (OSError, AttributeError):  # an older kernel or Python: the polling
            self._close()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def wait(self) -> None:
        live = [fd for p, fd in self.fds.items() if p.returncode is None]
        if live:
            select.select(live, [], [], 0.5)  # a stage ended, or look again anyway
            return
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 0.05)


#: at most this many lines of what a command said on its way to success are logged
WARNING_LINES = 10


def said_on_success(name: Sequence[str], err: IO[bytes]) -> None:
    """What a command that succeeded wrote on stderr, as warnings: GNU tar, rsync and cpio
    exit 0 after warning of what they could not do (an ACL whose user name does not resolve, an
    attribute the filesystem refuses), and that must reach the admin, not vanish."""
    err.seek(0)
    lines = [ln for ln in err.read(64 * 1024).decode("utf-8", "replace").splitlines()
             if ln.strip()]
    tool = os.path.basename(name[0])
    box = getattr(_box, "name", None)
    prog = f"box {box}: {tool}" if box else tool
    for line in lines[:WARNING_LINES]:
        said, sep, rest = line.strip().partition(": ")
        # GNU tar names itself as it was started: "tar: " or "/usr/bin/tar: "
        log.warning("%s: %s", prog, rest if sep and os.path.basename(said) == tool else line.strip())
    if len(lines) > WARNING_LINES:
        log.warning("%s: (%d more lines like these)", prog, len(lines) - WARNING_LINES)


def pipeline_data(procs: List[subprocess.Popen], names: Sequence[Any], hashing: bool,
                  reader: Optional[Callable[[IO[bytes]], None]], fout: Any,
                  stdout_path: Optional[str], stop: Callable[[subprocess.Popen], None]
                  ) -> Tuple[Optional[str], Optional[int]]:
    """pipeline()'s data phase: the last stage's output hashed into fout or given to reader,
    then every stage waited for. Returns the digest and the stage to blame."""
    digest: Optional[str] = None
    if hashing:
        output = procs[-1].stdout
        assert output is not None
        try:
            with output:
                digest = hashcopy.copy_hashing(output, fout.fileno())
        except OSError as exc:  # a full disk
            raise errors.OutputWriteError(names[-1], str(stdout_path),
                                          exc.strerror or str(exc)) from None
    if reader is not None:
        output = procs[-1].stdout
        assert output is not None
        with output:
            reader(output)
    return digest, wait_stages(procs, stop)
