"""The command helpers: every stage checked, the right one blamed, nothing left behind."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from vmim import process, procscan
from vmim.errors import CommandError, ToolMissingError


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_pipeline_passes_data_through_every_stage(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(b"hello\n" * 1000)
    process.pipeline([["gzip", "-c"], ["gzip", "-dc"]], stdin_path=str(src), stdout_path=str(out))
    assert out.read_bytes() == src.read_bytes()


def test_a_sandboxed_stage_is_fed_through_a_pipe_as_large_as_fan_outs(tmp_path):
    """A sandboxed first stage reads the image through a pipe this process feeds
    (vmim.handoff): that pipe is given fan_out's 1 MiB buffer, not the default 64 KiB (twice
    the copying, in sixteen times as many writes). The stage (marked sandboxed by the seccomp
    descriptor it names, as vmim.sandbox.command marks it) reads its input, then says."""
    from vmim.sandbox import SECCOMP_FD

    if os.geteuid() != 0 and int(open("/proc/sys/fs/pipe-max-size").read()) < 1 << 20:
        pytest.skip("this system's pipes are smaller than 1 MiB for this user")
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(os.urandom(3 << 20))
    says = ("import fcntl, os, sys\n"
            "while os.read(0, 1 << 16): pass\n"
            "print(fcntl.fcntl(0, 1032))  # F_GETPIPE_SZ\n")
    process.pipeline([["python3", "-c", says, SECCOMP_FD]], stdin_path=str(src),
                     stdout_path=str(out))
    assert int(out.read_text()) == 1 << 20


def test_an_image_that_cannot_be_read_to_its_end_fails_the_pipeline(tmp_path, monkeypatch):
    """A read error half-way through the image (a failing disk: EIO) ends the feeder thread
    and the sandboxed stage's input with it; that stage sees a short input, which may end on
    a member boundary and exit 0: the pipeline raises the read error instead."""
    import errno

    from vmim import handoff
    from vmim.sandbox import SECCOMP_FD

    def reads_half(src, stdins, failed=()):
        os.write(stdins[0].fileno(), os.read(src.fileno(), 4096))
        stdins[0].close()
        raise OSError(errno.EIO, "Input/output error", str(src.name))

    monkeypatch.setattr(handoff, "copy_into", reads_half)
    src = tmp_path / "in"
    src.write_bytes(os.urandom(1 << 20))
    with pytest.raises(OSError) as info:
        process.pipeline([["python3", "-c", "import sys; sys.stdin.buffer.read()", SECCOMP_FD]],
                         stdin_path=str(src))
    assert info.value.errno == errno.EIO


def test_a_failing_first_stage_is_named_even_when_the_last_succeeds(tmp_path):
    with pytest.raises(CommandError) as exc:
        process.pipeline([["tar", "-cf", "-", str(tmp_path / "missing")], ["gzip", "-c"]],
                         stdout_path=str(tmp_path / "out"))
    assert exc.value.argv[0] == "tar" and "missing" in exc.value.stderr_tail


def test_the_stage_that_died_is_blamed_not_the_one_it_broke(tmp_path):
    # yes writes forever; head exits 3 early; yes then dies of SIGPIPE, which is not blamed
    with pytest.raises(CommandError) as exc:
        process.pipeline([["yes"], ["sh", "-c", "head -c 10 >/dev/null; exit 3"]])
    assert exc.value.argv[0] == "sh" and exc.value.returncode == 3


def test_a_missing_tool_in_a_later_stage_leaves_no_process_or_descriptor(tmp_path):
    before = open_fds()
    with pytest.raises(ToolMissingError) as exc:
        process.pipeline([["yes"], ["no-such-tool-vmim"]], stdout_path=str(tmp_path / "out"))
    assert exc.value.tool == "no-such-tool-vmim"
    assert open_fds() == before
    assert process._live == set()


def test_run_reports_the_exit_code_and_stderr():
    with pytest.raises(CommandError) as exc:
        process.run(["sh", "-c", "echo boom >&2; exit 4"])
    assert exc.value.returncode == 4 and exc.value.stderr_tail == "boom"
    assert process.run(["echo", "ok"], capture=True).stdout == "ok\n"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_stopped_command_takes_what_it_forked_with_it(tmp_path):
    # rsync forks its receiver: stopping only the parent let the receiver write on into an
    # image being removed. Here sh forks a sleep and the timeout stops the command.
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError, match="timed out"):
        process.run(["sh", "-c", f"sleep 60 & echo $! >{pidfile}; wait"], timeout=1)
    assert not _alive(int(pidfile.read_text()))


def test_a_failed_pipeline_stage_takes_what_it_forked_with_it(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError):
        process.pipeline([["sh", "-c", f"sleep 60 & echo $! >{pidfile}; exit 3"], ["cat"]])
    assert not _alive(int(pidfile.read_text()))


def test_commands_left_running_by_a_killed_run_are_stopped_by_the_next(tmp_path):
    import subprocess

    work, elsewhere = tmp_path / "debris", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()

    def spawn(owner, cwd):
        return subprocess.Popen(["sleep", "60"], cwd=cwd,
                                env={**os.environ, procscan.OWNER_ENV: owner})

    orphan = spawn("999999999:1", work)  # of a run that is gone, working in the debris
    with open("/proc/1/stat") as fh:  # pid 1 outlives any run: its children are not orphans
        init_tag = f"1:{fh.read().rsplit(')', 1)[1].split()[19]}"
    adopted = spawn(init_tag, work)
    daemon = spawn("999999999:1", elsewhere)  # a helper daemon of a gone run, not in the way
    try:
        stopped = procscan.reap_orphans([str(work)])
        assert orphan.wait(timeout=5) == -9
        assert any(f"pid {orphan.pid} (sleep" in s for s in stopped)
        assert adopted.poll() is None and daemon.poll() is None
        assert len(stopped) == 1
    finally:
        for p in (orphan, adopted, daemon):
            p.kill()
            p.wait()


def test_a_checksummed_pipeline_writes_the_output_and_returns_its_digest(tmp_path):
    from vmim import digest as digest_mod

    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(os.urandom(3 << 20) * 20)  # 60 MiB: more than one writeback step
    digest = process.pipeline([["gzip", "-1c"]], stdin_path=str(src), stdout_path=str(out),
                              checksum=True)
    algorithm = digest_mod.preferred()
    assert digest == f"{algorithm}:{digest_mod.of_file(str(out), algorithm)}"
    assert process.pipeline([["gzip", "-dc"]], stdin_path=str(out),
                            stdout_path=str(tmp_path / "back"), checksum=False) is None
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_a_full_disk_under_a_checksummed_pipeline_is_a_command_failure(tmp_path):
    from vmim.errors import OutputWriteError

    with pytest.raises(OutputWriteError) as exc:
        process.pipeline([["head", "-c", "10000000", "/dev/zero"], ["gzip", "-1c"]],
                         stdout_path="/dev/full", checksum=True)
    assert exc.value.exit_code == 6 and "No space left on device" in str(exc.value)
    assert "/dev/full" in str(exc.value) and process._live == set()


def test_a_failing_command_takes_what_it_forked_with_it(tmp_path):
    # the command ends on its own with an error while a helper it forked would run on
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError) as exc:
        process.run(["sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! >{pidfile}; exit 3"])
    assert exc.value.returncode == 3
    assert not _alive(int(pidfile.read_text()))


def test_the_next_store_stops_what_a_killed_run_left_writing_into_its_debris(tmp_path):
    import subprocess

    from vmim.store import TMP_PREFIX, ImageStore

    gone = subprocess.Popen(["true"])
    gone.wait()
    debris = tmp_path / f"{TMP_PREFIX}golden.{gone.pid}"
    debris.mkdir()
    writer = subprocess.Popen(["sleep", "60"], cwd=debris,
                              env={**os.environ, procscan.OWNER_ENV: f"{gone.pid}:1"})
    try:
        assert ImageStore(str(tmp_path)).clean_debris() == [debris.name]
        assert writer.wait(timeout=5) == -9
        assert not debris.exists()
    finally:
        writer.kill()
        writer.wait()


# ------------------------------------------------------------------ fan_out


def _collect(into):
    def reader(stream):
        into.append(stream.read())
    return reader


def test_fan_out_gives_one_decompression_to_every_reader(tmp_path):
    data = os.urandom(3 << 20)
    image = tmp_path / "image.gz"
    image.write_bytes(subprocess.run(["gzip", "-c"], input=data, check=True,
                                     capture_output=True).stdout)
    counted, summed = [], []
    process.fan_out(str(image), ["gzip", "-dc"], [
        process.Sink(["wc", "-c"], _collect(counted)),
        process.Sink(["sh", "-c", "sha256sum >&2"], _collect(summed), read="stderr"),
    ])
    assert int(counted[0]) == len(data)
    assert summed[0].split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_fan_out_without_a_source_lets_each_reader_read_the_file(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(b"x" * 100_000)
    got = []
    process.fan_out(str(image), None, [process.Sink(["wc", "-c"], _collect(got)),
                                       process.Sink(["wc", "-c"], _collect(got))])
    assert [int(g) for g in got] == [100_000, 100_000]


def test_fan_out_blames_a_failing_source_before_its_readers(tmp_path):
    image = tmp_path / "image.gz"
    packed = subprocess.run(["gzip", "-c"], input=os.urandom(1 << 20), check=True,
                            capture_output=True).stdout
    image.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(CommandError) as err:
        process.fan_out(str(image), ["gzip", "-dc"], [
            process.Sink(["sh", "-c", "cat >/dev/null; exit 3"], _collect([]))])
    assert err.value.argv[0] == "gzip"


def test_fan_out_checks_every_readers_exit_status(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(b"data")
    process.fan_out(str(image), None, [process.Sink(["sh", "-c", "cat; exit 1"], _collect([]),
                                                    ok_codes=(0, 1))])
    with pytest.raises(CommandError, match="exit code 2"):
        process.fan_out(str(image), ["cat"], [
            process.Sink(["cat"], _collect([])),
            process.Sink(["sh", "-c", "cat >/dev/null; exit 2"], _collect([]))])


def test_fan_out_stops_everything_when_a_reader_fails(tmp_path):
    image = tmp_path / "image"
    image.write_bytes(os.urandom(8 << 20))

    def refuse(stream):
        stream.read(10)
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        process.fan_out(str(image), ["cat"], [process.Sink(["cat"], refuse),
                                              process.Sink(["cat"], _collect([]))])


def test_a_stage_that_reports_its_failure_after_closing_its_output_is_the_one_blamed():
    """As a decompressor that finds the damage at the end: it closes its output (the next stage
    fails of the short input at once) and only then exits with its own error."""
    with pytest.raises(CommandError) as err:
        process.pipeline([["sh", "-c", "exec 1>&-; sleep 0.2; exit 4"],
                          ["sh", "-c", "cat >/dev/null; exit 5"]])
    assert err.value.returncode == 4


def test_a_missing_program_names_its_debian_package():
    from vmim.errors import ToolMissingError
    from vmim.process import require_tool

    with pytest.raises(ToolMissingError) as exc:
        require_tool("zstd-that-is-not-there")
    assert exc.value.exit_code == 7
    assert str(exc.value) == "required program 'zstd-that-is-not-there' was not found on PATH"
    assert str(ToolMissingError("zstd")) == ("required program 'zstd' was not found on PATH; "
                                             "install it (Debian: apt install zstd)")
    assert str(ToolMissingError("/usr/bin/qemu-img")).endswith("(Debian: apt install qemu-utils)")
    assert str(ToolMissingError("kpartx", "use mapper = \"loop\"")).endswith("; use mapper = \"loop\"")
    # a hint says why it is needed (prove() always gives one): the package is named too
    assert str(ToolMissingError("zstd", "it is needed to unpack image 'web'")) == (
        "required program 'zstd' was not found on PATH; install it (Debian: apt install zstd); "
        "it is needed to unpack image 'web'")


def test_the_debian_package_table_names_programs_the_code_runs_and_packages_setup_installs():
    """vmim.errors.DEBIAN_PACKAGES repeats tools/setup-host's package list: a package it names
    is one setup-host installs, and a program it names is one the code names (outside the
    table); an entry for a program nothing runs is dead."""
    import ast
    import re

    from vmim.errors import DEBIAN_PACKAGES

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "tools", "setup-host"), encoding="utf-8") as fh:
        setup = re.search(r"^PACKAGES=\((.*?)^\)", fh.read(), re.S | re.M)
    assert setup, "tools/setup-host has no PACKAGES=( ... ) list"
    installed = set(setup.group(1).split())
    named = set()
    for top, _dirs, files in os.walk(os.path.join(root, "vmim")):
        for f in files:
            if f.endswith(".py") and os.path.join(top, f) != os.path.join(root, "vmim",
                                                                          "errors.py"):
                with open(os.path.join(top, f), encoding="utf-8") as fh:
                    named |= {n.value for n in ast.walk(ast.parse(fh.read()))
                              if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert sorted(set(DEBIAN_PACKAGES.values()) - installed) == []
    assert sorted(set(DEBIAN_PACKAGES) - named) == []



def test_a_sandboxed_command_is_handed_no_host_file_that_has_a_name(tmp_path):
    """It could open it again through /proc/self/fd, for writing too: a named file, a named
    FIFO, a device node; a pipe, a socket and an unlinked temporary file are no such thing."""
    import socket
    import tempfile

    from vmim import handoff

    named, fifo = tmp_path / "named", tmp_path / "fifo"
    named.write_bytes(b"x")
    os.mkfifo(fifo)
    r, w = os.pipe()
    a, b = socket.socketpair()
    fifo_fd = os.open(fifo, os.O_RDWR)  # O_RDWR: a FIFO opens without a peer
    try:
        with open(named, "rb") as f, open("/dev/null", "rb") as null, \
                tempfile.TemporaryFile() as tmp:
            for given in (f, fifo_fd, null):
                assert handoff.host_file(given), given
                with pytest.raises(ValueError, match="host file as its stdin"):
                    handoff.check_streams({"stdin": given})
            for given in (r, w, a, tmp, None, subprocess.PIPE, subprocess.DEVNULL):
                assert not handoff.host_file(given), given
    finally:
        for fd in (r, w, fifo_fd):
            os.close(fd)
        a.close()
        b.close()


def test_a_signal_while_a_command_starts_stops_that_command(monkeypatch):
    """Raised inside subprocess.Popen, after the fork, the signal left the command running
    and known to nobody: it wrote on into a slot the run was releasing (2026-12-07). It is
    kept until the run waits (vmim.signals), for the command: then it is raised, and the
    command stopped."""
    import signal

    from vmim import frontend, process, signals
    from vmim.errors import Interrupted

    real = subprocess.Popen
    started = []

    def popen_then_signal(*args, **kwargs):
        proc = real(*args, **kwargs)
        started.append(proc)
        frontend._raise_interrupt(signal.SIGTERM, None)  # the handler, mid-start
        return proc

    monkeypatch.setattr(process.subprocess, "Popen", popen_then_signal)
    signals.reset()
    try:
        with pytest.raises(Interrupted):
            process.run(["sleep", "30"])
    finally:
        signals.reset()
    assert started and started[0].poll() is not None  # stopped, not left running
    assert not process._live


def test_a_signal_is_raised_only_where_the_run_waits_and_only_once(tmp_path, monkeypatch):
    """The handler ran inside Thread.start() of the writeback pusher, after its descriptor of
    the slot was open and before the `try` that closes it: the descriptor stayed open and the
    release found the slot busy (the fleet's frozen-worker test, 2026-12-07). Outside a wait
    the signal is kept; the next wait raises it; once raised, later signals are kept for good
    (the clean-up runs to its end)."""
    import signal
    import threading

    from vmim import frontend, process, signals, writeback
    from vmim.errors import Interrupted

    real_start = threading.Thread.start

    def start_then_signal(self):
        real_start(self)
        if self.name == writeback.THREAD_NAME:
            frontend._raise_interrupt(signal.SIGTERM, None)  # the handler, mid-start

    monkeypatch.setattr(threading.Thread, "start", start_then_signal)
    signals.reset()
    try:
        with writeback.pushed_to_disk(str(tmp_path)):
            assert signals.pending()  # kept: the body runs on
        assert not [t for t in threading.enumerate() if t.name == writeback.THREAD_NAME]
        assert not [fd for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path)]
        with pytest.raises(Interrupted):
            process.check_cancelled()  # between steps: raised
        frontend._raise_interrupt(signal.SIGINT, None)  # a second one, outside a wait
        frontend._raise_interrupt(signal.SIGINT, None)  # ... and inside one
        assert process.run(["true"]).returncode == 0  # the clean-up's commands still run
        with signals.waiting():
            frontend._raise_interrupt(signal.SIGINT, None)
    finally:
        signals.reset()


def test_a_signal_waits_out_the_clean_up_of_another_failure():
    """A fleet job whose lease ran out failed before its release step; the clean-up's release
    met its worker's SIGTERM in the unmount and left the slot mounted (full run of
    2026-12-07). Inside signals.kept() a wait raises nothing; the signal comes after it."""
    import signal

    from vmim import frontend, process, signals
    from vmim.errors import Interrupted

    signals.reset()
    try:
        with signals.kept():
            frontend._raise_interrupt(signal.SIGTERM, None)
            assert process.run(["true"]).returncode == 0
            with signals.waiting():
                frontend._raise_interrupt(signal.SIGTERM, None)
            process.check_cancelled()
        with pytest.raises(Interrupted):
            process.check_cancelled()
    finally:
        signals.reset()
