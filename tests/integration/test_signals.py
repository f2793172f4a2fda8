"""A signal at any moment of a run: it stops the run where the run waits, and the run gives back
everything it holds (vmim.signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from vmim import lock
from vmim.disk import hold, loop, mounts


def test_a_run_frozen_and_terminated_at_any_moment_releases_the_slot(root_slot, tmp_path,
                                                                    vmim):
    """What a fleet worker does to the command of a job it lost while frozen (SIGSTOP of its
    process group, then SIGTERM once it runs again), at moments spread over a tree restore:
    the signal is delivered where the command resumes. Raised there, inside Thread.start() of
    the writeback pusher, it left the pusher's descriptor of the slot open: the release after
    the failure found the slot busy, and the slot stayed mounted, held against its domain
    (1 run in 5 to 12 of the fleet's test, 2026-12-07). Every run ends released, whether it
    finished (0, or killed on its way out) or was stopped
    (143)."""
    root_slot.make(200, ["mkfs.ext4", "-q", "-F"])
    box, disk, cfg = root_slot.box, root_slot.img, root_slot.config()
    mnt = tmp_path / "mnt" / box
    assert vmim("--config", cfg, "-b", box, "--mount").code == 0
    for i in range(40):
        with open(mnt / f"blob{i}", "wb") as fh:
            fh.write(os.urandom(1 << 20))
    assert vmim("--config", cfg, "-b", box, "-s", "tree", "--release").code == 0
    outcomes = set()
    for delay in (0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5) * 2:
        proc = subprocess.Popen([sys.executable, "-m", "vmim", "--config", cfg, "-b", box,
                                 "-r", "tree", "--release"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while mounts.mounted_at(str(mnt)) is None and proc.poll() is None:
            assert time.monotonic() < deadline, "the restore never mounted the slot"
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        # -15: done, and killed on its way out (its handlers are given back at the end)
        where = f"signalled {delay} s after the mount (exit {proc.returncode}): {err}"
        assert proc.returncode in (0, 143, -signal.SIGTERM), where
        outcomes.add(proc.returncode)
        assert mounts.mounted_at(str(mnt)) is None, where
        assert loop.loops_backed_by(disk) == [], where
        assert hold.our_holders(disk) == [], where
        assert lock.holder(str(tmp_path / "locks"), box) is None, where
    assert 143 in outcomes  # the signal did stop runs (not only runs already done)
    r = vmim("--config", cfg, "-b", box, "-r", "tree", "--release")
    assert r.code == 0, r  # and the slot takes the image again
