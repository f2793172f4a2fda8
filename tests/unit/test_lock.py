"""Per-slot locks between processes, and who holds them."""

from __future__ import annotations

import os
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
