"""vmim.disk.hold without root: QEMU's lock bytes on a plain file, taken and tested as QEMU
does, and the process that holds them named."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vmim.disk import hold
from vmim.errors import StateError

#: What QEMU 7.2 holds on a guest's read-write disk (seen in /proc/locks): it has consistent
#: read and write (100, 101) and does not share write (201).
QEMU_LIKE = f"""
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
for byte in (100, 101, 201):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("{hold._FLOCK}", fcntl.F_RDLCK, 0, byte, 1, 0))
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return str(path)


@pytest.fixture
def qemu_like(disk):
    proc = subprocess.Popen([sys.executable, "-c", QEMU_LIKE, disk], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_disk_nobody_holds_is_free(disk):
    hold.check_free(disk, "disk")
    assert hold.holders(disk) == []


def test_a_qemu_holding_the_disk_is_refused_and_named(disk, qemu_like):
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert hold.conflicts(fd) == ['"write"', 'shared "write"']
    finally:
        os.close(fd)
    (h,) = hold.holders(disk)
    assert h.pid == qemu_like.pid and not h.ours
    with pytest.raises(StateError) as exc:
        with hold.hold_disk(disk, "disk"):
            pass
    assert exc.value.exit_code == 4
    assert f"pid {qemu_like.pid} (python" in str(exc.value) and "in use by another process" \
        in str(exc.value)


def test_the_hold_denies_what_qemu_wants_and_ends_with_it(disk):
    with hold.hold_disk(disk, "disk") as held:
        fd = os.open(disk, os.O_RDONLY)  # another open file description: another opener
        try:
            # a guest disk (wants write, shares read and unchanged writes) is denied both ways
            assert hold.conflicts(fd, hold.CONSISTENT_READ | hold.WRITE,
                                  hold.CONSISTENT_READ | hold.WRITE_UNCHANGED) == \
                ['"write"', 'shared "write"']
            # a reader that shares everything (qemu-img info -U) is not
            assert hold.conflicts(fd, hold.CONSISTENT_READ, hold.ALL) == []
        finally:
            os.close(fd)
        assert held.path == disk
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert hold.conflicts(fd) == []
    finally:
        os.close(fd)


def test_a_holder_process_keeps_the_hold_and_is_ours(disk):
    if os.geteuid() != 0:
        pytest.skip("a holder process is the tool's only when root runs it")
    with hold.hold_disk(disk, "disk") as held:
        pid = hold.keep(held)
    try:
        deadline = time.monotonic() + 5
        while not hold.our_holders(disk) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hold.our_holders(disk) == [pid]
        (h,) = hold.holders(disk)
        assert h.pid == pid and h.ours and hold.HOLDER in h.description
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        hold.check_free(disk, "disk", ignore=lambda x: x.ours)
        with pytest.raises(StateError):
            hold.check_free(disk, "disk")
        with hold.hold_disk(disk, "disk"):  # a later command works beside our holder
            pass
    finally:
        os.kill(pid, 15)
        os.waitpid(pid, 0)
    assert hold.holders(disk) == []
