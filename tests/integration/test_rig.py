"""The leak check owns what this test session made, and only that: on a real hypervisor other
domains run and start, other loop devices and mounts come and go, and `make test` must neither
report nor touch them."""

from __future__ import annotations

import os
import subprocess
import tempfile

from tests import rig


def _attach(path: str) -> str:
    return subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_foreign_loops_mounts_and_domains_are_not_the_sessions(tmp_path, domains):
    foreign_dir = tempfile.mkdtemp(prefix="vmim-foreign-", dir="/var/tmp")
    os.chmod(foreign_dir, 0o755)
    foreign_img = os.path.join(foreign_dir, "other.img")
    own_img = str(tmp_path / "own.img")
    for img in (foreign_img, own_img):
        subprocess.run(["truncate", "-s", "8M", img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    foreign_mnt = os.path.join(foreign_dir, "mnt")
    os.mkdir(foreign_mnt)
    foreign_loop = own_loop = ""
    mounted = False
    foreign_dom = f"vmim-foreign-{os.getpid()}"  # another user's domain: not of our prefix
    try:
        foreign_loop = _attach(foreign_img)
        own_loop = _attach(own_img)
        subprocess.run(["mount", foreign_loop, foreign_mnt], check=True)
        mounted = True
        domains.define(foreign_dom, start=True, disk=foreign_img)
        ours = domains.define(domains.name("own"), start=True)
        loops, mnts, doms, _daemons, _holders, _sandboxes = rig._owned()
        assert not any(lo.startswith(foreign_loop + " ") for lo in loops)
        assert any(lo.startswith(own_loop + " ") for lo in loops)
        assert not any(foreign_mnt in m for m in mnts)
        assert foreign_dom not in doms
        assert ours in doms
    finally:
        if mounted:
            subprocess.run(["umount", foreign_mnt], check=True)
        for lo in (foreign_loop, own_loop):
            if lo:
                subprocess.run(["losetup", "-d", lo], check=True)
        subprocess.run(["rm", "-rf", "--", foreign_dir], check=True)
