"""A run killed by SIGKILL leaves nothing running: each command dies with it (process.popen's
death guard), and what escaped that (a run of an older version, a sandbox caught half set up)
is stopped by the next run on the same paths (procscan.reap_orphans). All with real processes,
bubblewrap and mount namespaces."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vmim import process, procscan

GONE_RUN = "999999999:1"  # an owner tag no process has


def _alive(pid):
    return (procscan._stat_fields(pid) or ["X"])[0] not in ("Z", "X")


def test_a_command_dies_with_the_run_that_started_it_when_that_run_is_killed():
    """Not only sandboxes: a mkfs or a qemu-img of a killed run would go on on a disk the next
    run maps."""
    script = ("import sys, time; from vmim import process; "
              "p = process.popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    command = int(run.stdout.readline())
    try:
        assert _alive(command)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert procscan.wait_gone([command], 5.0) == []
    finally:
        run.stdout.close()
        if _alive(command):
            os.kill(command, signal.SIGKILL)


def test_a_command_whose_run_was_gone_before_it_could_be_signalled_never_starts(tmp_path):
    """The run died between its fork and setpriv's prctl(): the command's parent is then
    another process (init, a subreaper), and the guard does not start the command."""
    marker = tmp_path / "ran"
    argv = ["touch", str(marker)]
    gone = subprocess.run(process.dies_with_run(argv, parent=os.getpid() + 1000000))
    assert gone.returncode != 0 and not marker.exists()
    alive = subprocess.run(process.dies_with_run(argv, parent=os.getpid()))
    assert alive.returncode == 0 and marker.exists()


def test_the_death_guard_passes_every_argument_through_as_data(tmp_path):
    out = subprocess.run(process.dies_with_run(
        ["printf", "%s|", "-c", "$PPID", "a b", "", "'\"", "--"]), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "-c|$PPID|a b||'\"|--|"


def test_a_missing_command_is_named_before_anything_starts():
    from vmim.errors import ToolMissingError

    with pytest.raises(ToolMissingError, match="no-such-tool-here"):
        process.popen(["no-such-tool-here", "x"])


def _namespace(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _spawn(argv, owner=GONE_RUN, **kwargs):
    return subprocess.Popen(argv, env={**os.environ, procscan.OWNER_ENV: owner},
                            stdin=subprocess.DEVNULL, **kwargs)


def _sandbox(bound, tag=GONE_RUN):
    """A sandbox of guest data as vmim.sandbox makes it (under the death guard, here of a
    parent that is alive: the test), binding `bound` at /slot, sleeping."""
    return _spawn(process.dies_with_run(
        ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib64", "/lib64",
         "--symlink", "usr/lib", "/lib", "--bind", str(bound), "/slot", "--unshare-pid",
         "--die-with-parent", "--", "/usr/bin/sleep", "60"]), tag)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_sandbox_of_a_gone_run_binding_the_slot_is_stopped_at_any_stage_of_its_start(
        tmp_path):
    """Read from its command line: a sandbox half set up (bwrap before its binds) uses no
    path and pins no mount yet. What binds another path, or is not a sandbox, stays."""
    slot, elsewhere = tmp_path / "slot", tmp_path / "elsewhere"
    slot.mkdir()
    elsewhere.mkdir()
    assert procscan.sandbox_sources(process.dies_with_run(
        ["bwrap", "--bind", str(slot), "/slot", "--die-with-parent", "--", "tar", "--bind",
         "/etc", "/slot"])) == [str(slot)]  # the command's own arguments are not binds
    # one not started yet: its shell waits (where the death guard's test runs) with bwrap's
    # argv still to come; it binds nothing and has no namespace of its own
    wrapped = process.dies_with_run(["bwrap", "--bind", str(slot), "/slot",
                                     "--die-with-parent", "--", "sleep", "60"])
    for _attempt in range(3):
        ours, theirs = _sandbox(slot), _sandbox(elsewhere)
        starting = subprocess.Popen([*wrapped[:wrapped.index("-c") + 1], "read x",
                                     *wrapped[wrapped.index("-c") + 2:]],
                                    env={**os.environ, procscan.OWNER_ENV: GONE_RUN},
                                    stdin=subprocess.PIPE)
        daemon = _spawn(["sleep", "60"], cwd=str(tmp_path))
        time.sleep(0.2)
        if all(p.poll() is None for p in (ours, theirs, starting, daemon)):
            break
        # a run of this tool elsewhere on the machine stopped one of these orphans of a gone
        # run (a bwrap being set up sees every mount of the host): start them again
        for p in (ours, theirs, starting, daemon):
            p.kill()
            p.wait()
        starting.stdin.close()
    try:
        assert ours.poll() is None and theirs.poll() is None and starting.poll() is None
        stopped = procscan.reap_orphans([str(slot)])
        assert ours.wait(timeout=5) == -9 and starting.wait(timeout=5) == -9
        assert any(f"pid {ours.pid} (" in s for s in stopped)
        assert any(f"pid {starting.pid} (" in s for s in stopped)
        assert theirs.poll() is None and daemon.poll() is None
    finally:
        for p in (ours, theirs, starting, daemon):
            p.kill()
            p.wait()
        starting.stdin.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_an_orphan_with_the_filesystem_mounted_in_its_own_namespace_is_stopped(tmp_path):
    """Whatever the mount point there: a process in a mount namespace of its own pins the
    filesystem (the release cannot let go of the slot's disk) wherever it sees it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vmim-test", str(mnt)], check=True)
    pinning = None
    try:
        pinning = _spawn(["unshare", "--mount", "--propagation", "private", "--",
                          "sh", "-c", f"mount --move {mnt} /mnt 2>/dev/null; exec sleep 60"])
        deadline = time.monotonic() + 5
        while _namespace(pinning.pid) in ("", _namespace("self")) \
                or "sleep" not in procscan.comm(str(pinning.pid)):
            assert time.monotonic() < deadline, "unshare did not start"
            time.sleep(0.01)
        stopped = procscan.reap_orphans([str(mnt)])
        assert pinning.wait(timeout=5) == -9
        assert len(stopped) == 1
    finally:
        if pinning is not None and pinning.poll() is None:
            pinning.kill()
            pinning.wait()
        subprocess.run(["umount", str(mnt)], check=True)
