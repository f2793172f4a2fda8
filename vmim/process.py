"""The one helper for external commands: argv lists only, logged, checked, typed errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, List, Optional, Sequence, Set

from vmim import handoff, procscan, progress, signals
from vmim.errors import CommandError, ToolMissingError, quote_argv
from vmim.stages import pipeline_data, said_on_success

log = logging.getLogger(__name__)

STDERR_TAIL = 2000


def _env(daemon: bool = False) -> dict:
    """Commands run in the C locale (their messages and output are parsed and quoted), marked
    with the run that started them — but a daemon meant to outlive the run (a qcow2 slot's
    FUSE export): the next run would take it for what a killed run left."""
    env = {**os.environ, "LC_ALL": "C", procscan.OWNER_ENV: procscan.owner_tag()}
    if daemon:
        del env[procscan.OWNER_ENV]
    return env


#: Every command dies with the run that started it, kill -9 included: it runs under
#: `setpriv --pdeathsig KILL` (util-linux; the kernel kills it when the thread that started it
#: ends, and this tool's threads wait for their commands), and then a shell checks that its
#: parent is still this run before it becomes the command: a run killed between its fork and
#: setpriv's prctl() sends no signal, and the command would go on alone (a sandbox unpacking
#: into a slot the next run is about to release, a mkfs on a disk it maps). The shell's PPID is
#: read after the prctl: either the run is alive then, and its death signals the command, or
#: it is not, and the command never starts.
SETPRIV = "setpriv"
SHELL = "/bin/sh"
DEATH_GUARD = 'test "$PPID" = "$0" && exec "$@"'


def dies_with_run(argv: Sequence[str], path: Optional[str] = None,
                  parent: Optional[int] = None) -> List[str]:
    """argv wrapped so that it dies with this run (see DEATH_GUARD); `parent` is the pid its
    parent must have (this process). A command not found on `path` (the PATH it will run with)
    is a ToolMissingError here, as it would be at its start."""
    argv = [os.fsdecode(a) for a in argv]
    if shutil.which(argv[0], path=path) is None:
        raise ToolMissingError(argv[0])
    setpriv = shutil.which(SETPRIV, path=path) or shutil.which(SETPRIV)
    if setpriv is None:
        raise ToolMissingError(SETPRIV, "it is part of util-linux: every command of a run "
                               "runs under setpriv --pdeathsig, so that it dies with the run")
    return [setpriv, "--pdeathsig", "KILL", "--", SHELL, "-c", DEATH_GUARD,
            str(os.getpid() if parent is None else parent), *argv]


def popen(argv: Sequence[str], *, daemon: bool = False, **kwargs: Any) -> subprocess.Popen:
    """Start a command in a process group of its own (so that stopping it stops whatever it
    forked, rsync's receiver say), in the C locale, marked as ours, dying with this run
    (dies_with_run). A sandbox's argv gets a descriptor of its own of the seccomp filter
    (vmim.sandbox.SECCOMP_FD)."""
    argv = [os.fsdecode(a) for a in argv]
    env = _env(daemon)
    filter_fd = None
    try:
        if handoff.sandbox_argv(argv):
            from vmim import seccomp
            from vmim.sandbox import SECCOMP_FD

            handoff.check_streams(kwargs)
            filter_fd = seccomp.fd()
            argv[argv.index(SECCOMP_FD)] = str(filter_fd)
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), filter_fd)
        proc = subprocess.Popen(dies_with_run(argv, env.get("PATH", os.defpath)), env=env,
                                start_new_session=True, **kwargs)
        with _live_lock:
            _live.add(proc)  # from its start: stop_live() finds it whatever comes next
    except FileNotFoundError:
        raise ToolMissingError(argv[0]) from None
    finally:
        if filter_fd is not None:
            os.close(filter_fd)
    return proc


def stop_live() -> None:
    """Stop every command started and not ended: none runs on behind an interrupted run."""
    with _live_lock:
        procs = list(_live)
    for p in procs:
        stop(p)


def stop(proc: subprocess.Popen) -> None:
    """Stop a command started by popen() and everything in its process group, and return only
    once all of it is gone: nothing it forked writes on behind our back (into an image being
    removed, or a filesystem being unmounted)."""
    with _live_lock:
        _live.discard(proc)
    # The group id is the leader's pid: it cannot name another group while the leader is not
    # yet reaped, nor while members of its own group live; once both are gone it may be reused.
    if proc.returncode is None:
        _kill_group(proc.pid)
        proc.wait()
    members = procscan.group_members(proc.pid)
    if members:  # helpers that outlived their command (or are dying of the kill above)
        _kill_group(proc.pid)
        left = procscan.wait_gone(members)
        if left:
            log.warning("processes %s of '%s' did not end", ", ".join(map(str, left)),
                        proc.args[0] if isinstance(proc.args, list) else proc.args)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
    daemon: bool = False,
) -> Result:
    """Run argv (never through a shell) and check its exit status. With daemon, argv starts
    a daemon that outlives the run: it is not marked as the run's (_env).

    With capture=True stdout and stderr are returned as text; otherwise stdout is
    inherited only when the caller wants it (it is not: stdout is for results), so it
    goes to DEVNULL, and stderr is kept for the error message.
    """
    from vmim.sandbox import shown

    name = shown(argv)  # a sandboxed command is named as itself in messages
    argv = [str(a) for a in argv]
    log.debug("+ %s", quote_argv(argv))
    proc = popen(
        argv,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        text=True,
        errors="surrogateescape",
        daemon=daemon,
    )
    with track(proc):
        try:
            with signals.waiting():
                stdout, stderr = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            proc.communicate()
            raise CommandError(name, -1, f"timed out after {timeout} s") from None
        except BaseException:
            stop(proc)
            raise
    stderr = stderr or ""
    if proc.returncode not in ok_codes:
        stop(proc)  # what it forked may outlive it (a stage killed by cancel_all())
        raise CommandError(name, proc.returncode, stderr[-STDERR_TAIL:])
    return Result(name, proc.returncode, stdout or "", stderr)


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
            _kill_group(p.pid, signal.SIGTERM)


def reset_cancel() -> None:
    """A new command starts uncancelled (matters when main() runs more than once)."""
    _cancelled.clear()


def check_cancelled() -> None:
    """Between steps: raise Interrupted for a signal kept until now (vmim.signals), and in a
    worker thread whose command was cancelled."""
    signals.check()
    if _cancelled:
        from vmim.errors import Interrupted

        raise Interrupted(_cancelled[0])


def read_head(argv: Sequence[str], nbytes: int) -> bytes:
    """Return at most the first nbytes a command writes to stdout, then stop it.

    For peeking inside a compressed stream without decompressing all of it.
    """
    argv = [str(a) for a in argv]
    log.debug("+ %s (first %d bytes)", quote_argv(argv), nbytes)
    proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    chunks = []
    got = 0
    try:
        with signals.waiting():
            while got < nbytes:
                chunk = proc.stdout.read(nbytes - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    finally:
        proc.stdout.close()
        stop(proc)  # running or not: it is no longer registered either
    return b"".join(chunks)


def _feed(src: IO[bytes], stdin: IO[bytes], unread: List[BaseException]) -> None:
    """handoff.copy_into in the pipeline's feeder thread: what reading src failed with is kept
    for the pipeline to raise (a thread's exception would otherwise vanish)."""
    try:
        handoff.copy_into(src, [stdin])
    except OSError as exc:
        unread.append(exc)


@contextlib.contextmanager
def output_of(argv: Sequence[str]) -> Iterator[IO[bytes]]:
    """Run argv and give its stdout to read (a decompressor feeding a reader in this process).

    After the body, the rest of the output is read and the command must end well: CommandError
    otherwise. When the body fails and the command failed first (the stream ended early because
    the command died), the command's failure is raised: it says why. Otherwise the command is
    stopped and the body's error goes on."""
    argv = [str(a) for a in argv]
    log.debug("+ %s | (read here)", quote_argv(argv))
    with tempfile.TemporaryFile() as err:
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        with track(proc), proc.stdout:
            try:
                with signals.waiting():  # the body reads: a signal may stop it
                    yield proc.stdout
                    while proc.stdout.read(1 << 20):  # a compression's own check: at its end
                        pass
            except Exception:
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    code = None  # still writing: the body stopped reading for its own reason
                if code in (None, 0):
                    stop(proc)
                    raise
            else:
                code = proc.wait()
            finally:
                if proc.returncode is None:
                    stop(proc)
        if code != 0:
            err.seek(0)
            tail = err.read()[-STDERR_TAIL:].decode("utf-8", "replace")
            raise CommandError(argv, proc.returncode, tail)


def pipeline(
    stages: Sequence[Sequence[str]],
    *,
    stdin_path: Optional[str] = None,
    stdout_path: Optional[str] = None,
    stdout_fd: Optional[int] = None,
    cwd: Optional[str] = None,
    watch_stage: int = 0,
    checksum: bool = False,
    reader: Optional[Callable[[IO[bytes]], None]] = None,
) -> Optional[str]:
    """Run stages connected by pipes (stage 1 | stage 2 | ...) and check every exit status.

    stdin of the first stage comes from stdin_path (else nothing), stdout of the last goes to
    stdout_path (else discarded). A failure names the stage that failed; a stage killed by
    SIGPIPE because a later stage died is not the one blamed. `watch_stage` is the stage
    whose reading a progress line follows. With `checksum` (and stdout_path), the output passes
    through this process on its way to the file and its digest is returned ('ALGORITHM:HEX',
    vmim.digest). With `reader` (and no stdout_path), the last stage's output is given to
    reader, which reads it to its end in this process (a listing to check, say); when reader
    raises, every stage is stopped and its error goes on. Or stdout goes to stdout_fd, an open file.

    A stage made by vmim.sandbox.command() runs in the sandbox; messages name its own command
    (tar, cpio), not bwrap.
    """
    from vmim.sandbox import shown

    names = [shown(s) for s in stages]  # what a failure blames
    boxed = [handoff.sandbox_argv(s) for s in stages]  # these are given pipes, never a host file
    stages = [[str(a) for a in s] for s in stages]
    log.debug("+ %s", " | ".join(quote_argv(s) for s in stages))
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(2, "No such directory", cwd)  # not a missing tool
    procs: List[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        fin: Any = files.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        fout: Any = files.enter_context(open(stdout_path, "wb")) if stdout_path \
            else stdout_fd if stdout_fd is not None else subprocess.DEVNULL
        stderr_files = [files.enter_context(tempfile.TemporaryFile()) for _ in stages]
        feeder: Optional[threading.Thread] = None
        unread: List[BaseException] = []  # what reading stdin_path failed with
        try:
            prev: Any = subprocess.PIPE if stdin_path and boxed[0] else fin
            hashing = stdout_path is not None and (checksum or boxed[-1])
            for i, argv in enumerate(stages):
                last = i == len(stages) - 1
                try:
                    p = popen(argv, stdin=prev,
                              stdout=fout if last and not hashing and reader is None
                              else subprocess.PIPE,
                              stderr=stderr_files[i], cwd=cwd)
                finally:
                    if prev not in (fin, subprocess.DEVNULL, subprocess.PIPE) and \
                            prev is not None:
                        prev.close()  # the child holds it now (or failed to start)
                if i == 0 and prev == subprocess.PIPE:
                    assert p.stdin is not None
                    feeder = threading.Thread(target=_feed, args=(fin, p.stdin, unread),
                                              daemon=True)
                    feeder.start()
                    files.callback(feeder.join)
                prev = p.stdout
                if prev is not None:
                    handoff.widen(prev)
                procs.append(p)
                files.enter_context(track(p, progress_too=i == watch_stage))
            with signals.waiting():  # every stage started and known: a signal may stop them
                digest, blamed = pipeline_data(procs, names, hashing, reader, fout,
                                              stdout_path, stop)
                if feeder is not None:
                    feeder.join()
            if unread:  # the image could not be read to its end (EIO): the stage saw a short
                raise unread[0]  # input, which may end on a member boundary and exit 0
        except BaseException:
            for p in procs:
                stop(p)
            raise
        if blamed is None:
            for name, err in zip(names, stderr_files):
                said_on_success(name, err)
            return digest if checksum else None
        stderr_files[blamed].seek(0)
        tail = stderr_files[blamed].read()[-STDERR_TAIL:].decode("utf-8", "replace")
    raise CommandError(names[blamed], procs[blamed].returncode, tail)


@dataclass(frozen=True)
class Sink:
    """One command of fan_out(): it reads the stream on its stdin; `reader` reads (in a thread
    of this process) its stdout, or its stderr when `read` is "stderr" (stdout then goes to
    /dev/null, which a reader of seekable output needs)."""

    argv: Sequence[str]
    reader: Callable[[IO[bytes]], None]
    read: str = "stdout"
    ok_codes: Sequence[int] = (0,)


def _drain(sink: Sink, stream: IO[bytes], proc: subprocess.Popen, failed: List[BaseException]
           ) -> None:
    try:
        with stream:
            sink.reader(stream)
    except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread
        failed.append(exc)
        stop(proc)  # its writer sees a broken pipe and goes on with the others


def fan_out(stdin_path: str, source: Optional[Sequence[str]], sinks: Sequence[Sink]) -> None:
    """Read stdin_path once through source (a decompressor) and give the stream to every sink
    at once: one decompression for several readers of an image. Without source, every sink
    reads stdin_path itself, at its own pace (a reader that seeks past data can) — unless one
    of them runs in the sandbox: then all are fed through pipes (vmim.handoff).

    Every exit status is checked: CommandError names the command that failed (the source
    first: a damaged stream makes its readers fail too). When a reader raises, every command
    is stopped and that error goes on."""
    from vmim.sandbox import shown as named

    argvs = [[str(a) for a in s.argv] for s in sinks]
    names = [named(s.argv) for s in sinks]  # a sandboxed command is named as itself
    shown = quote_argv(list(source)) + " | " if source else f"< {stdin_path} "
    log.debug("+ %stee %s", shown, " ".join(f">({quote_argv(a)})" for a in names))
    procs: List[subprocess.Popen] = []
    failed: List[BaseException] = []
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(open(stdin_path, "rb"))
        src: Optional[subprocess.Popen] = None
        src_err = stack.enter_context(tempfile.TemporaryFile())
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in sinks]
        threads: List[threading.Thread] = []
        feed: Optional[IO[bytes]] = None
        try:
            if source:
                src = popen([str(a) for a in source], stdin=fin, stdout=subprocess.PIPE,
                            stderr=src_err)
                stack.enter_context(track(src))
                assert src.stdout is not None
                feed = stack.enter_context(src.stdout)
            else:  # a sandboxed sink gets a pipe: never the host file (popen() refuses it)
                feed = fin if any(handoff.sandbox_argv(s.argv) for s in sinks) else None
            for sink, argv, err in zip(sinks, argvs, errs):
                on_stderr = sink.read == "stderr"
                own = stack.enter_context(open(stdin_path, "rb")) if feed is None else None
                p = popen(argv, stdin=subprocess.PIPE if own is None else own,
                          stdout=subprocess.DEVNULL if on_stderr else subprocess.PIPE,
                          stderr=subprocess.PIPE if on_stderr else err)
                procs.append(p)
                stack.enter_context(track(p, progress_too=False))
                out = p.stderr if on_stderr else p.stdout
                assert out is not None
                t = threading.Thread(target=_drain, args=(sink, out, p, failed), daemon=True)
                t.start()
                threads.append(t)
            with signals.waiting():  # every command started and known: a signal may stop them
                cut_short = feed is not None and not handoff.copy_into(
                    feed, [p.stdin for p in procs], failed)
                for t in threads:
                    t.join()
                if src is not None:
                    if cut_short:  # nobody reads on: the rest of the stream is of no use
                        stop(src)
                    src.wait()
                codes = [p.wait() for p in procs]
        except BaseException:
            for p in [*procs, *([src] if src else [])]:
                stop(p)
            raise
        if failed:
            raise failed[0]
        if src is not None and src.returncode != 0 and not cut_short:
            src_err.seek(0)
            raise CommandError(list(source or ()), src.returncode,
                               src_err.read()[-STDERR_TAIL:].decode("utf-8", "replace"))
        for sink, name, code, err in zip(sinks, names, codes, errs):
            if code not in sink.ok_codes:
                err.seek(0)
                raise CommandError(name, code,
                                   err.read()[-STDERR_TAIL:].decode("utf-8", "replace"))
