"""The command helpers: every stage checked, the right one blamed, nothing left behind."""

from __future__ import annotations

import os

import pytest

from vmim import process
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
