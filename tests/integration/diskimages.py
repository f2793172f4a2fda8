"""Real disk images for the tests: truncate, sfdisk, mkfs, a marker file in each filesystem."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from typing import Iterator, Optional, Sequence

MiB = 1024 * 1024
SECTOR = 512


def run(*argv: str, input: Optional[bytes] = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, input=input).stdout.decode()


@contextlib.contextmanager
def attached(path: str, offset: int = 0, size: int = 0) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"]
    if offset:
        argv += ["--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    dev = run(*argv, path).strip()
    try:
        yield dev
    finally:
        run("losetup", "--detach", dev)


@contextlib.contextmanager
def mounted(device: str, options: str = "") -> Iterator[str]:
    mp = tempfile.mkdtemp(prefix="vmim-test-mnt-")
    argv = ["mount"] + (["-o", options] if options else []) + [device, mp]
    run(*argv)
    try:
        yield mp
    finally:
        run("umount", mp)
        os.rmdir(mp)


def make_fs(device: str, fstype: str, label: str) -> None:
    if fstype == "xfs":
        run("mkfs.xfs", "-q", "-f", "-L", label, device)
    else:
        run(f"mkfs.{fstype}", "-q", "-F", "-L", label, device)


def write_marker(device: str, text: str) -> None:
    with mounted(device) as mp:
        with open(os.path.join(mp, "marker"), "w") as fh:
            fh.write(text + "\n")
        os.makedirs(os.path.join(mp, "etc"), exist_ok=True)


def sparse_file(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


def partitioned_image(path: str, label: str, sizes_mib: Sequence[int],
                      filesystems: Sequence[Optional[str]]) -> None:
    """An image with a `label` (dos or gpt) table; partition N gets filesystems[N-1] and the
    marker 'partition N'. None leaves a partition without a filesystem."""
    total = sum(sizes_mib) + 2
    sparse_file(path, total * MiB)
    script = f"label: {label}\n" + "".join(f",{s}M,L\n" for s in sizes_mib)
    run("sfdisk", "-q", path, input=script.encode())
    import json

    table = json.loads(run("sfdisk", "--json", path))["partitiontable"]
    for n, (part, fstype) in enumerate(zip(table["partitions"], filesystems), start=1):
        if fstype is None:
            continue
        with attached(path, part["start"] * SECTOR, part["size"] * SECTOR) as dev:
            make_fs(dev, fstype, f"part{n}")
            write_marker(dev, f"partition {n}")


def filesystem_image(path: str, fstype: str, size_mib: int, marker: str) -> None:
    sparse_file(path, size_mib * MiB)
    with attached(path) as dev:
        make_fs(dev, fstype, "bare")
        write_marker(dev, marker)


def raw_golden(path: str, marker: str) -> None:
    """A small raw disk image: MBR, partition 1 ext4 holding /marker."""
    partitioned_image(path, "dos", [24], ["ext4"])
    with attached(path, MiB) as dev, mounted(dev) as mp:
        with open(os.path.join(mp, "marker"), "w") as fh:
            fh.write(marker + "\n")


def qcow2_golden(path: str, marker: str, virtual: str = "20G", raw: str = "") -> None:
    """raw_golden as a qcow2 image of virtual size `virtual` (keeping the raw one at `raw`)."""
    raw_path = raw or path + ".raw"
    raw_golden(raw_path, marker)
    run("qemu-img", "convert", "-O", "qcow2", raw_path, path)
    run("qemu-img", "resize", "-q", path, virtual)
    if not raw:
        os.unlink(raw_path)
