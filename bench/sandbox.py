"""`bench/sandbox.py`: what the sandbox of guest data (vmim.sandbox, bubblewrap) costs.

    bench/sandbox.py [--base REV] [SECTION...]   (sections: restore store rsync insert seccomp)

Three contenders, run alternately (A B C, C B A, ...) ROUNDS times on the same slots, with the
data on the disk at the end of each (`sync -f`):

- vmimagemanager: this tree, every tar, cpio, rsync and merge in the sandbox;
- vmimagemanager@REV: the tool at git revision REV (default main) without it (`git archive`);
- the bare tools doing the same work by hand.

Sections: restore tar.zst (clear = delete), store tar.zst, restore rsync (a mirror onto the
slot holding the tree with 1 % of its files changed: rsync's own work is small, so the fixed
cost of the sandbox shows most), store rsync, insert (a 20-file tgz: a command whose work is
tiny, so the cost is the sandbox's start-up per process). Corpus: a copy of /usr/share (about
700 MB, 20,000+ files) on a loop-mounted ext4 slot, built once in VMIM_BENCH_DIR (default
/var/cache/vmimagemanager-bench-sandbox). Results: medians, spreads, ratios to the base
revision and to the bare tools, in bench/results/latest-sandbox.json.

Section seccomp (needs no corpus, run alone: `bench/sandbox.py seccomp`): the cost of the
seccomp filter (vmim.seccomp) per system call, inside the sandbox with and without it
(`--seccomp FD` left out), alternated: dd copying one byte at a time (a read and a write per
byte, C), Python calling getppid() and fstat() (allowed whatever their arguments: the kernel's
cache of such verdicts answers them without running the filter) and ioctl(FIONREAD) (ioctl has
argument rules, an allow-list: the whole filter runs). Each program times its own loop. On a machine shared
with other test runs, run it in a mount namespace of its own (`unshare -m --propagation
private bench/sandbox.py`) so that no other run's clean-up unmounts its slots.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORK = os.environ.get("VMIM_BENCH_DIR", "/var/cache/vmimagemanager-bench-sandbox")
ROUNDS = int(os.environ.get("VMIM_BENCH_ROUNDS", "5"))
CORPUS = os.environ.get("VMIM_BENCH_CORPUS", "/usr/share")
DISK_BYTES = 3 * 1024 ** 3
PY = sys.executable
CFG = os.path.join(WORK, "bench.cfg")
STORE = os.path.join(WORK, "store")
INSERTS = os.path.join(WORK, "inserts")
MNT = os.path.join(WORK, "mnt")
SRC, DST = "vmim-bench-sbx-src", "vmim-bench-sbx-dst"

results: Dict[str, dict] = {}


def shell(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)


def mnt(box: str) -> str:
    return os.path.join(MNT, box)


class Tool:
    """One version of vmimagemanager: its package directory first on the path."""

    def __init__(self, label: str, root: str):
        self.label = label
        self.root = root

    def run(self, *argv: str) -> None:
        env = dict(os.environ, PYTHONPATH=self.root)
        res = subprocess.run([PY, "-m", "vmim", "--config", CFG, "-q", *argv],
                             capture_output=True, text=True, env=env, cwd="/")
        if res.returncode != 0:
            raise SystemExit(f"bench: {self.label} {' '.join(argv)} failed ({res.returncode}):\n"
                             f"{res.stderr}{res.stdout}")


def extract_base(rev: str) -> str:
    out = os.path.join(WORK, f"base-{rev}")
    if not os.path.isdir(out):
        os.makedirs(out)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "vmim"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def compare(key: str, contenders: Dict[str, Callable[[], None]], before: Callable[[], None],
            base: str, bare: str) -> None:
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    before()
    contenders[bare]()  # warm-up, untimed
    for r in range(ROUNDS):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            before()
            t = time.monotonic()
            contenders[name]()
            times[name].append(time.monotonic() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    results[key] = {
        "median_s": med, "runs_s": times,
        "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
        "sandbox_cost": med[list(contenders)[0]] / med[base] - 1,
        "sandbox_cost_s": med[list(contenders)[0]] - med[base],
        "ratio_to_bare": {k: v / med[bare] for k, v in med.items()},
    }
    print(f"{key}: " + ", ".join(f"{k} {v:.3f} s [{min(times[k]):.3f}-{max(times[k]):.3f}]"
                                 for k, v in med.items())
          + f"; sandbox cost {results[key]['sandbox_cost'] * 100:+.1f} %", flush=True)


def setup(tool: Tool) -> None:
    for d in (STORE, INSERTS, MNT):
        os.makedirs(d, exist_ok=True)
    for box in (SRC, DST):
        disk = os.path.join(WORK, f"{box}.img")
        if not os.path.exists(disk):
            with open(disk, "wb") as fh:
                fh.truncate(DISK_BYTES)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", disk], check=True)
    with open(CFG, "w") as fh:
        fh.write(f'[vmim.local]\nmount = "{MNT}"\nvmimages = "{STORE}"\n'
                 f'vminserts = "{INSERTS}"\nlockdir = "{WORK}/locks"\nstatedir = "{WORK}/state"\n'
                 f'[vmim.vm.src]\nHostName = "{SRC}"\nroot = "{WORK}/{SRC}.img"\n'
                 f'[vmim.vm.dst]\nHostName = "{DST}"\nroot = "{WORK}/{DST}.img"\n')
    tool.run("-b", SRC, "--mount")
    stamp = os.path.join(mnt(SRC), ".corpus-complete")
    if not os.path.exists(stamp):
        shell(f"cp -a {shlex.quote(CORPUS)}/. {shlex.quote(mnt(SRC))}/")
        open(stamp, "w").close()
    with tarfile.open(os.path.join(INSERTS, "certs"), "w:gz") as t:
        for i in range(20):
            info = tarfile.TarInfo(f"etc/ssl/bench/cert{i}.pem")
            data = os.urandom(1500)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    for name, flag in (("bench.zst", "--zstd"), ("bench.tree", "-y")):
        if not os.path.exists(os.path.join(STORE, name)):
            tool.run("-b", SRC, flag, "-s", name)
    tool.run("-b", SRC, "--release")


SECCOMP_LOOPS = int(os.environ.get("VMIM_BENCH_SYSCALLS", "1000000"))
#: name -> (program run in the sandbox, printing the seconds of its loop, system calls made)
SECCOMP_PROGRAMS = {
    "dd bs=1 (read+write)": (["sh", "-c", f"dd if=/dev/zero of=/dev/null bs=1 "
                              f"count={SECCOMP_LOOPS // 2} 2>&1 | "
                              "sed -n 's/.*copied, \\([0-9.e-]*\\) s.*/\\1/p'"],
                             SECCOMP_LOOPS),
    "python getppid": (["python3", "-S", "-c", "import os, time\n"
                        "t = time.perf_counter()\n"
                        f"for _ in range({SECCOMP_LOOPS}): os.getppid()\n"
                        "print(time.perf_counter() - t)"], SECCOMP_LOOPS),
    "python fstat": (["python3", "-S", "-c", "import os, time\n"
                      "t = time.perf_counter()\n"
                      f"for _ in range({SECCOMP_LOOPS}): os.fstat(0)\n"
                      "print(time.perf_counter() - t)"], SECCOMP_LOOPS),
    "python ioctl FIONREAD": (["python3", "-S", "-c", "import fcntl, os, termios, time\n"
                               "r, w = os.pipe()\nb = bytearray(4)\n"
                               "t = time.perf_counter()\n"
                               f"for _ in range({SECCOMP_LOOPS}): "
                               "fcntl.ioctl(r, termios.FIONREAD, b)\n"
                               "print(time.perf_counter() - t)"], SECCOMP_LOOPS),
}


def bench_seccomp() -> None:
    """ns per system call in the sandbox with and without the seccomp filter."""
    from vmim import process, sandbox

    for name, (argv, calls) in SECCOMP_PROGRAMS.items():
        filtered = sandbox.command(argv, [], caps=sandbox.NONE)
        at = filtered.index("--seccomp")
        bare = sandbox.Sandboxed(filtered[:at] + filtered[at + 2:])
        bare.shown = filtered.shown
        times: Dict[str, List[float]] = {"filter": [], "no filter": []}
        for r in range(ROUNDS):
            order = [("filter", filtered), ("no filter", bare)]
            for label, cmd in (order if r % 2 == 0 else order[::-1]):
                out = process.run(cmd, capture=True).stdout.split()
                times[label].append(float(out[-1]) / calls * 1e9)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[f"seccomp: {name}"] = {
            "ns_per_call_median": med, "ns_per_call_runs": times, "calls": calls,
            "filter_cost_ns": med["filter"] - med["no filter"],
            "ratio": med["filter"] / med["no filter"],
            # on a loaded machine the fastest run of each is the one least disturbed
            "filter_cost_ns_of_minima": min(times["filter"]) - min(times["no filter"]),
        }
        print(f"seccomp {name}: {med['filter']:.1f} ns/call with the filter, "
              f"{med['no filter']:.1f} without [{min(times['filter']):.1f}-"
              f"{max(times['filter']):.1f} / {min(times['no filter']):.1f}-"
              f"{max(times['no filter']):.1f}]; ratio {med['filter'] / med['no filter']:.3f}; "
              f"minima: +{min(times['filter']) - min(times['no filter']):.1f} ns",
              flush=True)


def change_one_percent(root: str, seed: int) -> None:
    files = []
    for dirpath, _dirs, names in os.walk(root):
        files += [os.path.join(dirpath, n) for n in names]
    rnd = random.Random(seed)
    for path in rnd.sample(sorted(files), max(1, len(files) // 100)):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "ab") as fh:
                fh.write(b"changed\n")


def _changer(mount: Callable[[], None]) -> Callable[[], None]:
    """Before each rsync restore: the slot mounted, 1 % of its files changed (a new choice each
    time), nothing dirty."""
    seed = [0]

    def go() -> None:
        mount()
        seed[0] += 1
        change_one_percent(mnt(DST), seed[0])
        subprocess.run(["sync"], check=True)
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="the revision without the sandbox")
    parser.add_argument("sections", nargs="*",
                        default=["restore", "store", "rsync", "insert", "seccomp"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root")
    os.makedirs(WORK, exist_ok=True)
    if "seccomp" in args.sections:
        bench_seccomp()
        args.sections.remove("seccomp")
    if not args.sections:
        write_results(args.base)
        return
    tools = [Tool("vmimagemanager (sandbox)", ROOT),
             Tool(f"vmimagemanager@{args.base} (no sandbox)", extract_base(args.base))]
    base = tools[1].label
    setup(tools[0])
    dst, src = shlex.quote(mnt(DST)), shlex.quote(mnt(SRC))
    zst, tree = shlex.quote(os.path.join(STORE, "bench.zst")), os.path.join(STORE, "bench.tree")
    out = shlex.quote(os.path.join(STORE, "bare"))

    from vmim.archive import rsync as rsync_mod
    from vmim.archive import tar as tar_mod
    xflags = " ".join(shlex.quote(f) for f in tar_mod.EXTRACT)
    cflags = " ".join(shlex.quote(f) for f in tar_mod.CREATE)
    rflags = " ".join(shlex.quote(f) for f in rsync_mod.FLAGS)

    def mounted(box: str) -> Callable[[], None]:
        def go() -> None:
            tools[0].run("-b", box, "--mount")
            subprocess.run(["sync"], check=True)
        return go

    def forget(name: str) -> None:
        subprocess.run(["rm", "-rf", "--", os.path.join(STORE, name),
                        os.path.join(STORE, ".vmim", f"{name}.json")], check=True)

    try:
        for section in args.sections:
            if section == "restore":
                def restore_by(t: Tool) -> Callable[[], None]:
                    def go() -> None:  # ends with the data on the disk, as the bare one
                        t.run("-b", DST, "-r", "bench.zst")
                        subprocess.run(["sync", "-f", mnt(DST)], check=True)
                    return go
                cont: Dict[str, Callable[[], None]] = {t.label: restore_by(t) for t in tools}
                cont["bare: rm -rf; zstd -dc | tar -x (the tool's flags); sync -f"] = \
                    lambda: shell(f"find {dst} -mindepth 1 -maxdepth 1 ! -name lost+found "
                                  f"-exec rm -rf --one-file-system {{}} + && "
                                  f"zstd -q -dc {zst} | tar -x -C {dst} {xflags} && sync -f {dst}")
                compare("restore tar.zst (clear = delete)", cont, mounted(DST), base, list(cont)[-1])
            elif section == "store":
                cont = {t.label: (lambda t=t: (forget("s"), t.run("-b", SRC, "--zstd", "-s", "s"))
                                  and None) for t in tools}
                cont["bare: tar -c (the tool's flags) | zstd -T0; sync -f"] = \
                    lambda: shell(f"tar -cf - -C {src} {cflags} . | zstd -q -T0 -c > {out} && "
                                  f"sync -f {out}")
                compare("store tar.zst", cont, mounted(SRC), base, list(cont)[-1])
                forget("s")
            elif section == "rsync":
                changed = _changer(mounted(DST))
                tools[0].run("-b", DST, "-r", "bench.tree")
                cont = {t.label: (lambda t=t: t.run("-b", DST, "-r", "bench.tree"))
                        for t in tools}
                cont["bare: rsync --delete (the tool's flags)"] = \
                    lambda: shell(f"rsync {rflags} --delete --exclude=/lost+found "
                                  f"{shlex.quote(tree)}/ {dst}/")
                compare("restore rsync (1 % changed)", cont, changed, base, list(cont)[-1])
                cont = {t.label: (lambda t=t: t.run("-b", SRC, "-y", "-s", "bench.tree"))
                        for t in tools}
                cont["bare: rsync --link-dest (the tool's flags)"] = \
                    lambda: shell(f"rsync {rflags} --one-file-system "
                                  f"--exclude=/lost+found --link-dest={shlex.quote(tree)} "
                                  f"{src}/ {out}/ && sync -f {out}")
                compare("store rsync (onto the previous image)", cont,
                        lambda: (shell(f"rm -rf {out}"), mounted(SRC)()) and None, base,
                        list(cont)[-1])
                subprocess.run(["rm", "-rf", "--", os.path.join(STORE, "bare")], check=True)
            elif section == "insert":
                cont = {t.label: (lambda t=t: t.run("-b", DST, "-i", "certs")) for t in tools}
                cont["bare: tar -xzf (the tool's flags)"] = \
                    lambda: shell(f"tar -xzf {shlex.quote(os.path.join(INSERTS, 'certs'))} "
                                  f"-C {dst} {xflags}")
                compare("insert (20 files)", cont, mounted(DST), base, list(cont)[-1])
    finally:
        for box in (SRC, DST):
            subprocess.run([PY, "-m", "vmim", "--config", CFG, "-q", "-b", box, "--release"],
                           capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    write_results(args.base)


def write_results(base: str) -> None:
    results["machine"] = {"cores": os.cpu_count(), "kernel": platform.release(),
                          "base": subprocess.run(["git", "-C", ROOT, "rev-parse", base],
                                                 capture_output=True, text=True).stdout.strip(),
                          "bwrap": subprocess.run(["bwrap", "--version"], capture_output=True,
                                                  text=True).stdout.strip(),
                          "corpus": CORPUS, "rounds": ROUNDS}
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", "latest-sandbox.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
