"""The cost of a qcow2 slot's FUSE export: the same tgz restored (and stored) through a raw slot
and through a qcow2 slot (an overlay on a base of the same disk), alternately, medians.

Both slots are a 2 GiB MBR disk whose partition 1 is an empty ext4; before every round each is
reset to that state (untimed: a sparse copy of the raw disk, a fresh overlay on the qcow2 base),
so both restores do the same work. Timed: the whole command, `vmimagemanager -b X -r tree
--release` (mount, clear, unpack, unmount, release; for the qcow2 slot also starting and stopping
qemu-storage-daemon), and `-z -s NAME --release`.

Run as root on an idle machine: `bench/qcow2_fuse.py [OUT.json]`. Work directory:
VMIM_BENCH_DIR/qcow2-fuse (default /var/cache/vmimagemanager-bench/qcow2-fuse), the corpus is
built there once (copies of /usr subtrees, >= VMIM_BENCH_FUSE_BYTES, default 400 MiB).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(os.environ.get("VMIM_BENCH_DIR", "/var/cache/vmimagemanager-bench"),
                    "qcow2-fuse")
ROUNDS = int(os.environ.get("VMIM_BENCH_ROUNDS", "3"))
CORPUS_BYTES = int(os.environ.get("VMIM_BENCH_FUSE_BYTES", str(400 * 1024 * 1024)))
SOURCES = ["/usr/share/doc", "/usr/lib/python3", "/usr/share/locale", "/usr/include",
           "/usr/lib/x86_64-linux-gnu", "/usr/share"]
DISK_MIB = 2048
CFG = os.path.join(WORK, "bench.cfg")
STORE = os.path.join(WORK, "store")
SLOTS = {"raw": "vmim-bench-raw", "qcow2": "vmim-bench-qcow2"}


def q(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def vmim(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "vmim", "--config", CFG, "-q", "--json", *argv],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"bench: vmimagemanager {' '.join(argv)} failed ({res.returncode}):\n"
                         f"{res.stderr}{res.stdout}")
    return json.loads(res.stdout)


def du(path: str) -> int:
    return int(q("du", "-sb", path).split()[0])


def build() -> None:
    os.makedirs(STORE, exist_ok=True)
    corpus = os.path.join(WORK, "corpus")
    if not os.path.isdir(corpus):
        os.makedirs(corpus + ".tmp", exist_ok=True)
        for src in SOURCES:
            if du(corpus + ".tmp") >= CORPUS_BYTES:
                break
            q("cp", "-a", src, os.path.join(corpus + ".tmp", src.strip("/").replace("/", "_")))
        os.rename(corpus + ".tmp", corpus)
    tree = os.path.join(STORE, "tree")
    if not os.path.exists(tree):
        q("tar", "--numeric-owner", "-czf", tree + ".tmp", "-C", corpus, ".")
        os.rename(tree + ".tmp", tree)
    empty = os.path.join(WORK, "empty.raw")
    if not os.path.exists(empty):
        with open(empty + ".tmp", "wb") as fh:
            fh.truncate(DISK_MIB * 1024 * 1024)
        subprocess.run(["sfdisk", "-q", empty + ".tmp"], input=b"label: dos\n,,L\n", check=True)
        start = json.loads(q("sfdisk", "--json", empty + ".tmp"))["partitiontable"]["partitions"][0]
        dev = q("losetup", "--find", "--show", "--offset", str(start["start"] * 512),
                "--sizelimit", str(start["size"] * 512), empty + ".tmp").strip()
        try:
            q("mkfs.ext4", "-q", "-F", dev)
        finally:
            q("losetup", "--detach", dev)
        os.rename(empty + ".tmp", empty)
    base = os.path.join(STORE, "base")
    if not os.path.exists(base):
        q("qemu-img", "convert", "-O", "qcow2", empty, base)
    with open(CFG, "w") as fh:
        fh.write(f"""[vmim.local]
vmimages = "{STORE}"
vminserts = "{STORE}"
mount = "{WORK}/mnt"
lockdir = "{WORK}/locks"
[vmim.vm.raw]
HostName = "{SLOTS['raw']}"
HostDisk = "{WORK}/raw.img"
partition = 1
[vmim.vm.qcow2]
HostName = "{SLOTS['qcow2']}"
HostDisk = "{WORK}/slot.qcow2"
partition = 1
""")


def reset(kind: str) -> None:
    if kind == "raw":
        q("cp", "--sparse=always", os.path.join(WORK, "empty.raw"), os.path.join(WORK, "raw.img"))
    else:
        q("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(STORE, "base"),
          "-F", "qcow2", os.path.join(WORK, "slot.qcow2"))


def timed(argv: List[str]) -> float:
    t = time.monotonic()
    vmim(*argv)
    return time.monotonic() - t


def main() -> None:
    build()
    times: Dict[str, Dict[str, List[float]]] = {"restore": {}, "store": {}}
    for r in range(ROUNDS):
        for kind in (["raw", "qcow2"] if r % 2 == 0 else ["qcow2", "raw"]):
            reset(kind)
            subprocess.run(["sync"], check=True)
            box = SLOTS[kind]
            times["restore"].setdefault(kind, []).append(timed(["-b", box, "-r", "tree",
                                                                "--release"]))
            times["store"].setdefault(kind, []).append(timed(["-b", box, "-z", "-s",
                                                              f"out-{kind}", "--release"]))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.release()}",
        "tree_bytes": du(os.path.join(WORK, "corpus")),
        "tree_files": q("find", os.path.join(WORK, "corpus")).count("\n"),
        "tgz_bytes": os.path.getsize(os.path.join(STORE, "tree")),
        "rounds": ROUNDS,
        "raw_seconds": times,
    }
    for op, by_kind in times.items():
        med = {k: round(statistics.median(v), 2) for k, v in by_kind.items()}
        result[f"{op}_median_s"] = med
        result[f"{op}_ratio_qcow2_to_raw"] = round(med["qcow2"] / med["raw"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            fh.write(text + "\n")
    for kind in SLOTS:  # leave nothing mounted or exported
        vmim("-b", SLOTS[kind], "--release")
    shutil.rmtree(os.path.join(WORK, "mnt"), ignore_errors=True)


if __name__ == "__main__":
    main()
