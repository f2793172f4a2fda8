"""Scratch directories of a run, and the sweep of those a killed run left (vmim.scratch)."""

from __future__ import annotations

import os
import subprocess
import sys

from vmim import procscan, scratch


def test_a_killed_runs_scratch_directory_goes_with_the_next_one_and_nothing_else(tmp_path):
    """A tar store killed mid-way left GNU tar's listing of every path of the guest in
    /dev/shm for good (an attack of 2026-12-07), the trial re-make its slot-sized file."""
    code = ("import os, signal, sys; from vmim import scratch\n"
            "with scratch.directory('index', base=sys.argv[1]) as d:\n"
            "    open(os.path.join(d, 'list'), 'w').write('/etc/shadow\\n')\n"
            "    print(d, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    left = done.stdout.strip()
    assert done.returncode == -9 and os.path.isdir(left), done
    pid, _, started = procscan.owner_tag().partition(":")
    mine = tmp_path / f"vmim-index-{pid}_{started}-live"  # a run that still works
    mine.mkdir()
    other = tmp_path / "vmim-notes"  # not a scratch directory
    other.mkdir()
    with scratch.directory("proof", base=str(tmp_path)) as d:
        assert os.path.isdir(d) and oct(os.stat(d).st_mode)[-3:] == "700"
        assert not os.path.exists(left)
    assert not os.path.exists(d)
    assert sorted(os.listdir(tmp_path)) == [f"vmim-index-{pid}_{started}-live",
                                            "vmim-notes"]
