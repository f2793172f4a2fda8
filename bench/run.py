"""`make bench`: vmimagemanager against the bare tools on the same data, in one run.

Each comparison runs its contenders alternately ROUNDS times and reports medians and ratios
(no timing is asserted anywhere: this is a measurement, docs/performance.md holds the results).

Corpus: copies of /usr subtrees of this machine (>= 1 GiB, >= 30,000 files) on a loop-mounted
ext4 slot, built once and reused (VMIM_BENCH_DIR, default /var/cache/vmimagemanager-bench).
Run as root on an otherwise idle machine. `bench/run.py SECTION...` runs some sections only
(startup, store, restore, rsync, cycle, disk-images).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import guest as guest_mod  # noqa: E402  (the booting guest of the e2e tests)

WORK = os.environ.get("VMIM_BENCH_DIR", "/var/cache/vmimagemanager-bench")
ROUNDS = int(os.environ.get("VMIM_BENCH_ROUNDS", "3"))
CORPUS_MIN_BYTES = int(os.environ.get("VMIM_BENCH_CORPUS_BYTES", str(1200 * 1024 * 1024)))
CORPUS_SOURCES = ["/usr/share", "/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3",
                  "/usr/lib/gcc", "/usr/include", "/usr/libexec", "/usr/lib"]
DISK_BYTES = 6 * 1024 ** 3
PY = sys.executable
TOOL = os.path.join(os.path.dirname(PY), "vmimagemanager")
CFG = os.path.join(WORK, "bench.cfg")
STORE = os.path.join(WORK, "store")
SRC, DST = "vmim-bench-src", "vmim-bench-dst"
MNT = os.path.join(WORK, "mnt")

results: Dict[str, dict] = {}


def q(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def shell(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)


def vmim(*argv: str, json_out: bool = False) -> dict:
    res = subprocess.run([TOOL, "--config", CFG, "-q", *argv, *(["--json"] if json_out else [])],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench: vmimagemanager {' '.join(argv)} failed ({res.returncode}):\n"
                         f"{res.stderr}{res.stdout}")
    return json.loads(res.stdout) if json_out else {}


def mnt(box: str) -> str:
    return os.path.join(MNT, box)


def timed(fn: Callable[[], None]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def compare(key: str, contenders: Dict[str, Callable[[], None]],
            before: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Run the contenders alternately ROUNDS times (untimed `before` each time); medians."""
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    for r in range(ROUNDS):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            if before:
                before()
            times[name].append(timed(contenders[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    results[key] = {"median_s": med, "runs_s": times}
    print(f"{key}: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()), flush=True)
    return med


# --------------------------------------------------------------------------- set-up


def make_slot_disk(path: str) -> None:
    with open(path, "wb") as fh:
        fh.truncate(DISK_BYTES)
    subprocess.run(["sfdisk", "-q", path], input="label: dos\n,,L\n", text=True, check=True)
    dev = q("losetup", "--find", "--show", "--offset", str(1024 * 1024), path).stdout.strip()
    try:
        q("mkfs.ext4", "-q", "-L", "bench", dev)
    finally:
        q("losetup", "--detach", dev)


def corpus_stats(root: str) -> dict:
    files = size = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files += 1
                size += os.lstat(p).st_size
    return {"files": files, "bytes": size}


def setup() -> guest_mod.Guest:
    os.makedirs(STORE, exist_ok=True)
    os.chmod(WORK, 0o755)
    guest = guest_mod.build()
    with open(CFG, "w") as fh:
        fh.write(f"""[vmim.local]
vmimages = "{STORE}"
mount = "{MNT}"
lockdir = "{WORK}/locks"
virt_type = "qemu"
[vmim.vm.src]
HostName = "{SRC}"
HostDisk = "{WORK}/src.img"
partition = 1
[vmim.vm.qcow2]
HostName = "vmim-bench-qcow2"
HostDisk = "{WORK}/q.qcow2"
[vmim.vm.dst]
HostName = "{DST}"
HostDisk = "{WORK}/dst.img"
partition = 1
memory = 262144
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
cmdline = "console=ttyS0 quiet vmim.mode=acpi"
serial_log = "{WORK}/console.log"
""")
        for i in range(8):  # more slots for the -l measurement (10 in all)
            fh.write(f'[vmim.vm.extra{i}]\nHostName = "vmim-bench-extra{i}"\n'
                     f'HostDisk = "{WORK}/extra{i}.img"\npartition = 1\n')
    for name in ("src", "dst"):
        if not os.path.exists(os.path.join(WORK, f"{name}.img")):
            make_slot_disk(os.path.join(WORK, f"{name}.img"))
    vmim("-b", SRC, "--mount")
    stamp = os.path.join(mnt(SRC), ".corpus-complete")
    if not os.path.exists(stamp):
        print("bench: building the corpus (once)", flush=True)
        total = 0
        for src in CORPUS_SOURCES:
            if total >= CORPUS_MIN_BYTES or not os.path.isdir(src):
                continue
            dest = os.path.join(mnt(SRC), src.strip("/").replace("/", "_"))
            q("cp", "-a", "--one-file-system", src, dest)
            total = corpus_stats(mnt(SRC))["bytes"]
        open(stamp, "w").close()
    stats = corpus_stats(mnt(SRC))
    results["corpus"] = {**stats, "sources": CORPUS_SOURCES,
                         "description": "copies of /usr subtrees of this Debian 12 machine"}
    print(f"corpus: {stats['files']} files, {stats['bytes'] / 1024 ** 3:.2f} GiB", flush=True)
    return guest


def fresh_dst() -> None:
    """dst: released, then re-made empty (untimed) for the bare tools to write into."""
    vmim("-b", DST, "-k", "--release")
    dev = q("losetup", "--find", "--show", "--offset", str(1024 * 1024),
            os.path.join(WORK, "dst.img")).stdout.strip()
    try:
        q("mkfs.ext4", "-q", "-F", "-L", "bench", dev)
    finally:
        q("losetup", "--detach", dev)
    vmim("-b", DST, "--mount")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)


# --------------------------------------------------------------------------- benchmarks


def bench_store() -> None:
    src = shlex.quote(mnt(SRC))
    out = shlex.quote(os.path.join(STORE, "bare"))
    compare("store tgz", {
        "vmimagemanager -z -s": lambda: vmim("-b", SRC, "-z", "-s", "bench.tgz"),
        "tar | pigz": lambda: shell(f"tar -cf - -C {src} . | pigz -c > {out}"),
        "tar -czf (0.3.15)": lambda: shell(f"tar -czf {out} -C {src} ."),
    }, before=drop_caches)
    compare("store tar.zst", {
        "vmimagemanager --zstd -s": lambda: vmim("-b", SRC, "--zstd", "-s", "bench.zst"),
        "tar | zstd -T0": lambda: shell(f"tar -cf - -C {src} . | zstd -q -T0 -c > {out}"),
        "tar | zstd -T0; sync; sha256sum": lambda: shell(
            f"tar -cf - -C {src} . | zstd -q -T0 -c > {out} && sync -f {out} && sha256sum {out}"
            " > /dev/null"),
    }, before=drop_caches)
    vmim("-b", SRC, "-w", "-s", "bench.cpio")
    os.unlink(os.path.join(STORE, "bare"))


def bench_restore() -> None:
    dst = shlex.quote(mnt(DST))
    zst = shlex.quote(os.path.join(STORE, "bench.zst"))
    cpio = shlex.quote(os.path.join(STORE, "bench.cpio"))
    set_clear("mkfs")
    compare("restore tar.zst", {
        "vmimagemanager -r (clear=mkfs)": lambda: vmim("-b", DST, "-r", "bench.zst"),
        "zstd -dc | tar -x": lambda: shell(f"zstd -dc {zst} | tar -x -C {dst}"),
        "sha256sum; zstd -dc | tar -x": lambda: shell(
            f"sha256sum {zst} > /dev/null && zstd -dc {zst} | tar -x -C {dst}"),
    }, before=fresh_dst)
    compare("restore cpio.bz2", {
        "vmimagemanager -r (clear=mkfs)": lambda: vmim("-b", DST, "-r", "bench.cpio"),
        "bzcat | cpio -i (0.3.15)": lambda: shell(f"cd {dst} && bzcat {cpio} | cpio -i --quiet"),
    }, before=fresh_dst)
    # clearing a full slot: re-making the filesystem against deleting file by file. The slot
    # is released and mounted again (untimed) first, as after a guest ran: no dirty pages of
    # the previous restore are left for the re-made filesystem's umount to write back.
    vmim("-b", DST, "-r", "bench.zst", "--release")

    def remount() -> None:
        vmim("-b", DST, "--release")
        vmim("-b", DST, "--mount")

    def restore_with(clear: str) -> Callable[[], None]:
        def run() -> None:
            set_clear(clear)
            vmim("-b", DST, "-r", "bench.zst")
        return run
    compare("restore tar.zst over a full slot", {
        "clear = mkfs": restore_with("mkfs"),
        "clear = delete": restore_with("delete"),
    }, before=remount)
    set_clear("mkfs")


def set_clear(how: Optional[str]) -> None:
    """The dst slot's clear; None: no clear line, the default a user's config has."""
    text = open(CFG).read()
    head, sep, tail = text.partition("[vmim.vm.dst]\n")
    tail = "".join(line for line in tail.splitlines(True) if not line.startswith("clear ="))
    line = f'clear = "{how}"\n' if how else ""
    open(CFG, "w").write(f"{head}{sep}{line}{tail}")


def change_one_percent(root: str, seed: int) -> int:
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        files += [os.path.join(dirpath, n) for n in filenames
                  if not os.path.islink(os.path.join(dirpath, n))]
    rnd = random.Random(seed)
    picked = rnd.sample(sorted(files), max(1, len(files) // 100))
    for p in picked:
        with open(p, "ab") as fh:
            fh.write(b"changed\n")
    return len(picked)


def bench_rsync() -> None:
    subprocess.run(["rm", "-rf", os.path.join(STORE, "bench.rsync")], check=True)
    first_store = timed(lambda: vmim("-b", SRC, "-s", "bench.rsync"))
    stores, restores = [], []
    fresh_dst()
    first_restore = timed(lambda: vmim("-b", DST, "-r", "bench.rsync"))
    for r in range(ROUNDS):
        change_one_percent(mnt(SRC), r)
        stores.append(timed(lambda: vmim("-b", SRC, "-s", "bench.rsync")))
        change_one_percent(mnt(DST), 100 + r)
        restores.append(timed(lambda: vmim("-b", DST, "-r", "bench.rsync")))
    # the floor of any new tree: hard-linking the previous one, nothing copied, nothing compared
    image = os.path.join(STORE, "bench.rsync")
    floor_tree = os.path.join(STORE, "floor")
    floors = []
    for _ in range(ROUNDS):
        floors.append(timed(lambda: q("cp", "-al", image, floor_tree)))
        floors[-1] += timed(lambda: q("rm", "-rf", floor_tree))
    results["rsync deltas"] = {
        "cp -al + rm -rf of the tree (floor of an atomic new tree) s": statistics.median(floors),
        "first store s": first_store, "re-store after 1% s": statistics.median(stores),
        "first restore s": first_restore, "re-restore after 1% s": statistics.median(restores),
        "runs": {"re-store": stores, "re-restore": restores}}
    print(f"rsync: store {first_store:.2f} → {statistics.median(stores):.2f} s, restore "
          f"{first_restore:.2f} → {statistics.median(restores):.2f} s", flush=True)


def bench_cycle() -> None:
    """The full cycle on a booting guest: -b dst -r golden -u, with the domain running."""
    vmim("-b", DST, "-r", "bench.zst", "-u")
    cycles = []
    for _ in range(ROUNDS):
        time.sleep(5)  # let the guest finish booting so that it answers the power button
        doc = vmim("-b", DST, "-r", "bench.zst", "-u", json_out=True)
        laps: Dict[str, float] = {}
        for s in doc["results"][0]["steps"]:
            for k, v in s.get("timings", {}).items():
                laps[k] = laps.get(k, 0.0) + v
        cycles.append(laps)
    vmim("-b", DST, "-k")
    med = {k: statistics.median(c[k] for c in cycles) for k in cycles[0]}
    image_gib = os.path.getsize(os.path.join(STORE, "bench.zst")) / 1024 ** 3
    tree_gib = results["corpus"]["bytes"] / 1024 ** 3
    results["full cycle -r golden -u"] = {"median step s": med, "runs": cycles,
                                          "total s": sum(med.values()),
                                          "s per GiB of tree": sum(med.values()) / tree_gib,
                                          "image GiB": image_gib}
    print(f"cycle: {med} total {sum(med.values()):.2f} s", flush=True)
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", DST],
                   capture_output=True)


def bench_startup() -> None:
    def median_of(argv: List[str], n: int = 10) -> float:
        ts = []
        for _ in range(n):
            ts.append(timed(lambda: subprocess.run(argv, capture_output=True, check=True)))
        return statistics.median(ts)
    results["start-up"] = {
        "--help s": median_of([TOOL, "--help"]),
        "-l with 10 slots s": median_of([TOOL, "--config", CFG, "-l"]),
    }
    code = ("import resource, sys; from vmim.cli import main; rc = main(sys.argv[1:]); "
            "sys.stderr.write('MAXRSS %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss);"
            " sys.exit(rc)")
    res = subprocess.run([PY, "-c", code, "--config", CFG, "-q", "-b", DST, "-r", "bench.zst"],
                         capture_output=True, text=True, cwd=ROOT)
    rss = [int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("MAXRSS")]
    results["start-up"]["peak RSS of a tar.zst restore, MiB"] = rss[0] / 1024 if rss else None
    print(f"start-up: {results['start-up']}", flush=True)


def bench_disk_images() -> None:
    """qcow2 overlay reset against a full copy; reflink resets of 1 and 8 GiB raw disks."""
    golden = os.path.join(STORE, "golden.qcow2")
    if not os.path.exists(golden):
        vmim("-b", SRC, "--release")
        q("qemu-img", "convert", "-O", "qcow2", os.path.join(WORK, "src.img"), golden)
        q("qemu-img", "resize", "-q", golden, "20G")
    slot = os.path.join(WORK, "q.qcow2")
    if not os.path.exists(slot):
        q("qemu-img", "create", "-q", "-f", "qcow2", slot, "20G")
    copy = os.path.join(WORK, "full-copy.qcow2")
    compare("qcow2 reset of a 20 GiB image", {
        "vmimagemanager -r (new overlay)": lambda: vmim("-b", "vmim-bench-qcow2", "-r",
                                                         "golden.qcow2"),
        "qemu-img convert (full copy)": lambda: q("qemu-img", "convert", "-O", "qcow2", golden,
                                                  copy),
    })
    os.unlink(copy)
    results["qcow2 reset of a 20 GiB image"]["golden allocated GiB"] = round(
        os.stat(golden).st_blocks * 512 / 1024 ** 3, 2)

    xfs_img, xfs = os.path.join(WORK, "xfs.img"), os.path.join(WORK, "xfs")
    if not os.path.exists(xfs_img):
        with open(xfs_img, "wb") as fh:
            fh.truncate(24 * 1024 ** 3)
        q("mkfs.xfs", "-q", "-m", "reflink=1", xfs_img)
    os.makedirs(xfs, exist_ok=True)
    dev = q("losetup", "--find", "--show", xfs_img).stdout.strip()
    q("mount", dev, xfs)
    try:
        os.makedirs(os.path.join(xfs, "images"), exist_ok=True)
        for gib in (1, 8):
            disk = os.path.join(xfs, f"disk{gib}.img")
            if not os.path.exists(disk):
                q("dd", "if=/dev/zero", f"of={disk}", "bs=4M", f"count={gib * 256}",
                  "conv=fsync", "status=none")
        cfg = os.path.join(WORK, "reflink.cfg")
        with open(cfg, "w") as fh:
            fh.write(f'[vmim.local]\nvmimages = "{xfs}/images"\nlockdir = "{WORK}/locks"\n'
                     'disk_image_format = "raw"\n')
            for gib in (1, 8):
                fh.write(f'[vmim.vm.r{gib}]\nHostName = "vmim-bench-reflink{gib}"\n'
                         f'HostDisk = "{xfs}/disk{gib}.img"\n')

        def reset(gib: int) -> Callable[[], None]:
            return lambda: q(TOOL, "--config", cfg, "-q", "-b", f"vmim-bench-reflink{gib}",
                             "--disk-image", "-r", f"snap{gib}")
        for gib in (1, 8):
            q(TOOL, "--config", cfg, "-q", "-b", f"vmim-bench-reflink{gib}", "--disk-image",
              "-s", f"snap{gib}")
        compare("reflink reset on xfs", {"1 GiB disk": reset(1), "8 GiB disk": reset(8)})
        full = os.path.join(xfs, "full-copy.img")
        compare("full copy on xfs (cp --reflink=never)", {
            f"{gib} GiB disk": (lambda g=gib: q("cp", "--reflink=never", "--sparse=never",
                                                os.path.join(xfs, f"disk{g}.img"), full))
            for gib in (1, 8)})
        os.unlink(full)
    finally:
        q("umount", xfs)
        q("losetup", "--detach", dev)


def machine() -> dict:
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "memory GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3),
            "tools": {t: _version(t) for t in ("tar", "rsync", "zstd", "pigz", "lbzip2", "gzip",
                                               "bzip2", "cpio")}}


def _version(tool: str) -> str:
    res = subprocess.run([tool, "--version"], capture_output=True, text=True)
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root")
    setup()
    sections = {"startup": bench_startup, "store": bench_store, "restore": bench_restore,
                "rsync": bench_rsync, "cycle": bench_cycle, "disk-images": bench_disk_images}
    chosen = sys.argv[1:] or list(sections)
    try:
        for name in chosen:
            sections[name]()
    finally:
        for box in (SRC, DST):
            subprocess.run([TOOL, "--config", CFG, "-q", "-b", box, "-k", "--release"],
                           capture_output=True)
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", DST],
                       capture_output=True)
    results["machine"] = machine()
    out = write_results("latest.json" if not sys.argv[1:] else f"latest-{'-'.join(chosen)}.json",
                        results)
    print(f"results: {out}")


def write_results(name: str, doc: dict) -> str:
    """Write a bench's results to bench/results/NAME (JSON); its path."""
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    out = os.path.join(ROOT, "bench", "results", name)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
