"""The command helpers: every stage checked, the right one blamed, nothing left behind."""

from __future__ import annotations

import os

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
