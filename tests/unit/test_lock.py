"""Per-slot locks between processes, and who holds them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vmim import lock
from vmim.errors import LockBusyError


def test_holder_names_another_process_and_probing_never_takes_the_lock(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from vmim import lock
        with lock.slot_lock({str(tmp_path)!r}, "web1"):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                     "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline() == "locked\n"
        h = lock.holder(str(tmp_path), "web1")
        assert h is not None and h.pid == proc.pid and "-c" in h.command
        with pytest.raises(LockBusyError, match=f"locked by pid {proc.pid}"):
            with lock.slot_lock(str(tmp_path), "web1"):
                pass
    finally:
        proc.stdin.close()
        proc.wait()
    assert lock.holder(str(tmp_path), "web1") is None
    with lock.slot_lock(str(tmp_path), "web1"):  # free again: nothing was left held
        assert lock.holder(str(tmp_path), "web1").pid == os.getpid()
    assert lock.holder(str(tmp_path), "never-locked") is None


def test_box_names_are_safe_file_names(tmp_path):
    with lock.slot_lock(str(tmp_path), "a/b c"):
        assert os.listdir(tmp_path) == ["a%2Fb%20c.lock"]


def test_a_command_line_that_is_not_utf8_is_recorded_as_given(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vmimagemanager", "-r", os.fsdecode(b"bad\xff")])
    with lock.slot_lock(str(tmp_path), "web1"):
        h = lock.holder(str(tmp_path), "web1")
        assert h is not None and h.pid == os.getpid()
        assert h.command == "vmimagemanager -r bad\ufffd"
    with open(lock.lock_path(str(tmp_path), "web1"), "rb") as fh:
        assert fh.read().endswith(b"-r bad\xff\n")


@pytest.mark.parametrize("outlives, free", [(0.5, True), (6, False)])
def test_a_lock_kept_by_the_commands_of_a_holder_that_died_is_waited_for_a_moment(
        tmp_path, outlives, free):
    """A run killed (kill -9) while it forks a command: the command holds the lock's open file
    for the moment it takes to die with the run (vmim.process: pdeathsig, the guard), and a
    --release right after the kill met a busy lock with no live holder: exit 5 (the full run
    of 2026-12-07). A lock whose holder is gone is waited for LOCK_GRACE seconds; a command
    that outlives its run longer still leaves it busy."""
    path = lock.lock_path(str(tmp_path), "web1")
    script = f'exec 9>"$0"; flock 9; sleep {outlives} >/dev/null 2>&1 & echo $!'
    run = subprocess.run(["sh", "-c", script, path], check=True, capture_output=True,
                         text=True)
    command = int(run.stdout)
    try:
        assert lock.holder(str(tmp_path), "web1") is not None  # its pid is gone
        if free:
            with lock.slot_lock(str(tmp_path), "web1"):
                assert lock.holder(str(tmp_path), "web1").pid == os.getpid()
        else:
            with pytest.raises(LockBusyError, match="locked by"):
                with lock.slot_lock(str(tmp_path), "web1"):
                    pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(command, signal.SIGKILL)
