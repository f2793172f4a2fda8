"""The one helper for external commands: argv lists only, logged, checked, typed errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Set

from vmim import progress
from vmim.errors import CommandError, ToolMissingError

log = logging.getLogger(__name__)

STDERR_TAIL = 2000


def quote_argv(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def _env() -> dict:
    """Commands run in the C locale: their messages and output are parsed and quoted."""
    return {**os.environ, "LC_ALL": "C"}


def pid_alive(pid_text: str) -> bool:
    """Whether a process with this pid (as text, from a file name) exists."""
    return pid_text.isdigit() and os.path.exists(f"/proc/{pid_text}")


def require_tool(tool: str, hint: str = "") -> str:
    """Return the full path of `tool`, or raise ToolMissingError."""
    path = shutil.which(tool)
    if path is None:
        raise ToolMissingError(tool, hint)
    return path


@dataclass(frozen=True)
class Result:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    capture: bool = False,
    input: Optional[str] = None,
    timeout: Optional[float] = None,
    ok_codes: Sequence[int] = (0,),
) -> Result:
    """Run argv (never through a shell) and check its exit status.

    With capture=True stdout and stderr are returned as text; otherwise stdout is
    inherited only when the caller wants it (it is not: stdout is for results), so it
    goes to DEVNULL, and stderr is kept for the error message.
    """
    argv = [str(a) for a in argv]
    log.debug("+ %s", quote_argv(argv))
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            env=_env(),
            text=True,
            errors="surrogateescape",
        )
    except FileNotFoundError:
        raise ToolMissingError(argv[0]) from None
    with track(proc):
        try:
            stdout, stderr = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise CommandError(argv, -1, f"timed out after {timeout} s") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    stderr = stderr or ""
    if proc.returncode not in ok_codes:
        raise CommandError(argv, proc.returncode, stderr[-STDERR_TAIL:])
    return Result(argv, proc.returncode, stdout or "", stderr)


# --------------------------------------------------------------------------- cancellation

_live: Set[subprocess.Popen] = set()
_live_lock = threading.Lock()
_cancelled: List[int] = []


@contextlib.contextmanager
def track(proc: subprocess.Popen, progress_too: bool = True) -> Iterator[subprocess.Popen]:
    """Register a running child so that cancel_all() can stop it (and a progress line
    can follow it)."""
    with _live_lock:
        _live.add(proc)
    if progress_too:
        progress.started(proc.pid)
    try:
        yield proc
    finally:
        with _live_lock:
            _live.discard(proc)


def cancel_all(signum: int) -> None:
    """A signal arrived while boxes run in worker threads: stop their commands; the steps
    then fail and their cleanup runs. Commands started after this (cleanup) run normally."""
    _cancelled.append(signum)
    with _live_lock:
        procs = list(_live)
    for p in procs:
        if p.poll() is None:
            p.terminate()


def reset_cancel() -> None:
    """A new command starts uncancelled (matters when main() runs more than once)."""
    _cancelled.clear()


def check_cancelled() -> None:
    """Raise Interrupted in a worker whose command was cancelled (between steps)."""
    if _cancelled:
        from vmim.errors import Interrupted

        raise Interrupted(_cancelled[0])


def read_head(argv: Sequence[str], nbytes: int, *, timeout: float = 30) -> bytes:
    """Return at most the first nbytes a command writes to stdout, then stop it.

    For peeking inside a compressed stream without decompressing all of it.
    """
    argv = [str(a) for a in argv]
    log.debug("+ %s (first %d bytes)", quote_argv(argv), nbytes)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise ToolMissingError(argv[0]) from None
    assert proc.stdout is not None
    chunks = []
    got = 0
    try:
        while got < nbytes:
            chunk = proc.stdout.read(nbytes - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=timeout)
    return b"".join(chunks)


def pipeline(
    stages: Sequence[Sequence[str]],
    *,
    stdin_path: Optional[str] = None,
    stdout_path: Optional[str] = None,
    cwd: Optional[str] = None,
    watch_stage: int = 0,
) -> None:
    """Run stages connected by pipes (stage 1 | stage 2 | ...) and check every exit status.

    stdin of the first stage comes from stdin_path (else nothing), stdout of the last goes to
    stdout_path (else discarded). A failure names the stage that failed; a stage killed by
    SIGPIPE because a later stage died is not the one blamed. `watch_stage` is the stage
    whose reading a progress line follows.
    """
    stages = [[str(a) for a in s] for s in stages]
    log.debug("+ %s", " | ".join(quote_argv(s) for s in stages))
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(2, "No such directory", cwd)  # not a missing tool
    procs: List[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        fin: Any = files.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        fout: Any = files.enter_context(open(stdout_path, "wb")) if stdout_path \
            else subprocess.DEVNULL
        stderr_files = [files.enter_context(tempfile.TemporaryFile()) for _ in stages]
        try:
            prev: Any = fin
            for i, argv in enumerate(stages):
                last = i == len(stages) - 1
                try:
                    p = subprocess.Popen(argv, stdin=prev, stdout=fout if last else subprocess.PIPE,
                                         stderr=stderr_files[i], cwd=cwd, env=_env())
                except FileNotFoundError:
                    raise ToolMissingError(argv[0]) from None
                finally:
                    if prev not in (fin, subprocess.DEVNULL) and prev is not None:
                        prev.close()  # the child holds it now (or failed to start)
                prev = p.stdout
                procs.append(p)
                files.enter_context(track(p, progress_too=i == watch_stage))
            codes = [p.wait() for p in procs]
        except BaseException:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            raise
        failed = [(i, c) for i, c in enumerate(codes) if c != 0]
        if not failed:
            return
        i, code = next(((i, c) for i, c in failed if c not in (-signal.SIGPIPE,
                                                                128 + signal.SIGPIPE)), failed[0])
        stderr_files[i].seek(0)
        tail = stderr_files[i].read()[-STDERR_TAIL:].decode("utf-8", "replace")
    raise CommandError(stages[i], code, tail)
