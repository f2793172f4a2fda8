"""`bench/restore.py`: restore (and store) against the bare tools, in one run, with the data
on the disk at the end of every contender.

    bench/restore.py [--base REV] [--debian] [SECTION...]
    (sections: store store-tgz restore cycle)

Each comparison runs its contenders alternately (A B C, C B A, ...) ROUNDS times on the slots
and corpus of `make bench` (bench/run.py set-up), and reports medians, ratios to the bare
tools and the spread of every contender. Every restore contender starts from the same state
(the slot mounted, its filesystem full of the previous restore, nothing dirty) and ends with
the restored tree on the slot's disk (`sync -f` of the slot's filesystem), so the writeback a
restore leaves behind is counted wherever it happens:

- restore tar.zst: `vmimagemanager -r` with the default config (no clear line: `auto`,
  which re-makes the corpus's slot, 55,945 inodes, and deletes Debian 12's, 13,613, beside
  the unpack) and with `clear = "mkfs"` (the same ext4 re-made) vs
  `umount; mkfs.ext4; mount; zstd -dc | tar -x; sync`
- restore tgz: the same with `pigz -dc`
- store tar.zst: `vmimagemanager --zstd -s` vs `tar | zstd -T0 > f; sync -f f`
- store tgz: `vmimagemanager -z -s` vs `tar | pigz > f; sync -f f`
- cycle: `-b dst -r golden -u` on a running guest (the default config, and clear = "mkfs"),
  with the phases of its --json timings

`--base REV` adds the tool as it was at git revision REV (extracted with `git archive`) as a
third contender, on the same images (their metadata gets a sha256 too, which that version
checks). `--debian` uses, instead of the /usr corpus, a Debian 12 system (mmdebstrap of
bookworm with systemd-sysv and linux-image-amd64, built once into WORK/debian12; needs the
mmdebstrap package and Debian's mirror) on a slot of its own (WORK/deb.img). `make bench` runs
this file twice: on the corpus, and with --debian (restore and store).
Peak RSS of each vmimagemanager run is recorded (getrusage of the children).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as b  # noqa: E402  (the set-up, slots and corpus of `make bench`)

from vmim.archive import tar as tar_mod  # noqa: E402

results: Dict[str, dict] = {}
PYTHONPATH = os.environ.get("PYTHONPATH", "")
DEBIAN_DIR = os.path.join(b.WORK, "debian12")


class Tool:
    """One version of vmimagemanager: its package directory first on the path, and the dst
    slot's clear it runs with (None: no clear line, the default a user's config has)."""

    def __init__(self, label: str, root: str, clear: Optional[str] = None):
        self.label = label
        self.root = root
        self.clear = clear
        self.rss_kib: List[int] = []
        # as installed: a Debian package's modules are byte-compiled when it is installed
        # (dh_python3), so no run compiles them (25 modules, 0.05 s a run where
        # PYTHONDONTWRITEBYTECODE is set, as it was in this session's shells)
        subprocess.run([b.PY, "-m", "compileall", "-q", os.path.join(root, "vmim")],
                       check=True, stdout=subprocess.DEVNULL)

    def run(self, *argv: str, json_out: bool = False) -> dict:
        b.set_clear(self.clear)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (self.root, PYTHONPATH) if p))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        code = ("import resource, sys; from vmim.cli import main; rc = main(sys.argv[1:]); "
                "sys.stderr.write('MAXRSS %d\\n' % "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        res = subprocess.run([b.PY, "-c", code, "--config", b.CFG, "-q", *argv,
                              *(["--json"] if json_out else [])],
                             capture_output=True, text=True, env=env, cwd="/")
        for line in res.stderr.splitlines():
            if line.startswith("MAXRSS"):
                self.rss_kib.append(int(line.split()[1]))
        if res.returncode != 0:
            raise SystemExit(f"bench: {self.label} {' '.join(argv)} failed ({res.returncode}):\n"
                             f"{res.stderr}{res.stdout}")
        return json.loads(res.stdout) if json_out else {}


def extract_base(rev: str) -> str:
    out = os.path.join(b.WORK, f"base-{rev}")
    if not os.path.isdir(out):
        os.makedirs(out)
        archive = subprocess.run(["git", "-C", b.ROOT, "archive", rev, "vmim"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def compare(key: str, contenders: Dict[str, Callable[[], Optional[dict]]],
            before: Optional[Callable[[], None]] = None, bare: str = "") -> Dict[str, float]:
    """Alternate the contenders ROUNDS times (untimed `before` each time): medians, spreads,
    and each one's ratio to the bare contender."""
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    laps: Dict[str, List[dict]] = {k: [] for k in contenders}
    if before:  # warm-up, untimed: the first contender must not pay for a cold cache alone
        before()
    contenders[bare or list(contenders)[-1]]()
    for r in range(b.ROUNDS):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            if before:
                before()
            t = time.monotonic()
            extra = contenders[name]()
            times[name].append(time.monotonic() - t)
            if extra:
                laps[name].append(extra)
    med = {k: statistics.median(v) for k, v in times.items()}
    entry: dict = {"median_s": med, "runs_s": times,
                   "spread_s": {k: [min(v), max(v)] for k, v in times.items()}}
    if bare:
        entry["ratio_to_bare"] = {k: v / med[bare] for k, v in med.items()}
        entry["ratio_range"] = {k: [min(v) / max(times[bare]), max(v) / min(times[bare])]
                                for k, v in times.items()}
    if any(laps.values()):
        entry["phases_median_s"] = {
            k: {p: statistics.median(x.get(p, 0.0) for x in v) for p in v[0]}
            for k, v in laps.items() if v}
    results[key] = entry
    save_partial()
    print(f"{key}: " + ", ".join(
        f"{k} {v:.2f} s [{min(times[k]):.2f}-{max(times[k]):.2f}]"
        + (f" ({entry['ratio_to_bare'][k]:.2f}x)" if bare else "") for k, v in med.items()),
        flush=True)
    return med


def save_partial() -> None:
    """What is measured so far, in case a later contender fails (a shared machine)."""
    with open(os.path.join(b.WORK, "partial-restore.json"), "w") as fh:
        json.dump(results, fh, indent=1)


def phases(doc: dict) -> dict:
    out: Dict[str, float] = {}
    for s in doc["results"][0]["steps"]:
        for k, v in s.get("timings", {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def slot_device() -> str:
    return b.q("findmnt", "-n", "-o", "SOURCE", b.mnt(b.DST)).stdout.strip()


def settle() -> None:
    """Before each contender: the slot mounted with the previous tree, nothing dirty."""
    b.vmim("-b", b.DST, "--mount")
    subprocess.run(["sync"], check=True)


def add_sha256(name: str) -> None:
    """Give an image stored by this version the sha256 that 1.0 recorded, beside its digest
    (this version checks BLAKE3 first; the base version checks the sha256)."""
    path = os.path.join(b.STORE, ".vmim", f"{name}.json")
    meta = json.load(open(path))
    if "sha256" not in meta:
        out = b.q("sha256sum", os.path.join(b.STORE, name)).stdout.split()[0]
        meta["sha256"] = out
        with open(path, "w") as fh:
            json.dump(meta, fh)


def restore_contenders(tools: List[Tool], image: str, decompress: str) -> dict:
    dst = shlex.quote(b.mnt(b.DST))
    img = shlex.quote(os.path.join(b.STORE, image))

    def by(tool: Tool) -> Callable[[], dict]:
        def go() -> dict:
            t = time.monotonic()
            laps = phases(tool.run("-b", b.DST, "-r", image, json_out=True))
            t1 = time.monotonic()
            subprocess.run(["sync", "-f", b.mnt(b.DST)], check=True)
            laps["sync (writeback left)"] = time.monotonic() - t1
            laps["total"] = time.monotonic() - t
            return laps
        return go

    def bare(flags: str, decompress: str = decompress) -> Callable[[], dict]:
        def go() -> dict:
            dev = shlex.quote(slot_device())
            t = time.monotonic()
            b.shell(f"umount {dst} && mkfs.ext4 -q -F -E nodiscard -L bench {dev} && "
                    f"mount -o noinit_itable {dev} {dst}")
            t1 = time.monotonic()
            b.shell(f"{decompress} {img} | tar -x -C {dst} {flags}")
            t2 = time.monotonic()
            b.shell(f"sync -f {dst}")
            t3 = time.monotonic()
            return {"mkfs": t1 - t, "unpack": t2 - t1, "sync (writeback left)": t3 - t2}
        return go

    out: Dict[str, Callable[[], Optional[dict]]] = {t.label: by(t) for t in tools}
    out["bare with the tool's tar flags (xattrs, ACLs, owners)"] = bare(
        " ".join(shlex.quote(f) for f in tar_mod.EXTRACT))
    if decompress.startswith("pigz") and shutil.which("igzip"):
        # the tool decompresses gzip with igzip where installed: the bare pipeline with it too
        out["bare: mkfs; igzip -dc | tar -x; sync"] = bare("", "igzip -dc")
    out[f"bare: mkfs; {decompress} | tar -x; sync"] = bare("")  # the last: what ratios are to
    return out


def restore_tools(tools: List[Tool]) -> List[Tool]:
    """The restore contenders of the tool: each version with the default config (auto), and
    this one with clear = "mkfs" too (the same filesystem re-made: what auto does with a
    large old content or without room for both)."""
    out = [tools[0], Tool(f"{tools[0].label}, clear = mkfs", tools[0].root, "mkfs")]
    return out + tools[1:]


def bench_restore(tools: List[Tool], suffix: str) -> None:
    only = os.environ.get("VMIM_BENCH_FORMATS", "tar.zst tgz").split()
    for image, fmt, decompress in ((f"bench{suffix}.zst", "tar.zst", "zstd -dc"),
                                   (f"bench{suffix}.tgz", "tgz", "pigz -dc")):
        if fmt not in only:
            continue
        cont = restore_contenders(restore_tools(tools), image, decompress)
        compare(f"restore {fmt}{suffix}", cont, before=settle, bare=list(cont)[-1])


def bench_store_tgz(tools: List[Tool], suffix: str, box: str) -> None:
    src = shlex.quote(b.mnt(box))
    out = shlex.quote(os.path.join(b.STORE, "bare"))
    cont: Dict[str, Callable[[], Optional[dict]]] = {
        t.label: (lambda t=t: t.run("-b", box, "-z", "-s", f"store-{t.label}") and None)
        for t in tools}
    flags = " ".join(shlex.quote(f) for f in tar_mod.CREATE)
    cont["bare with the tool's tar flags (xattrs, ACLs, sparse)"] = lambda: b.shell(
        f"tar -cf - -C {src} {flags} . | pigz -c > {out} && sync -f {out}")
    cont["bare: tar | pigz; sync -f"] = lambda: b.shell(
        f"tar -cf - -C {src} . | pigz -c > {out} && sync -f {out}")
    compare(f"store tgz{suffix}", cont, before=lambda: subprocess.run(["sync"], check=True),
            bare="bare: tar | pigz; sync -f")
    for t in tools:
        os.unlink(os.path.join(b.STORE, f"store-{t.label}"))
    os.unlink(os.path.join(b.STORE, "bare"))


def bench_store(tools: List[Tool], suffix: str, box: str) -> None:
    src = shlex.quote(b.mnt(box))
    out = shlex.quote(os.path.join(b.STORE, "bare"))
    cont: Dict[str, Callable[[], Optional[dict]]] = {
        t.label: (lambda t=t: t.run("-b", box, "--zstd", "-s", f"store-{t.label}") and None)
        for t in tools}
    flags = " ".join(shlex.quote(f) for f in tar_mod.CREATE)
    cont["bare with the tool's tar flags (xattrs, ACLs, sparse)"] = lambda: b.shell(
        f"tar -cf - -C {src} {flags} . | zstd -q -T0 -c > {out} && sync -f {out}")
    cont["bare: tar | zstd -T0; sync -f"] = lambda: b.shell(
        f"tar -cf - -C {src} . | zstd -q -T0 -c > {out} && sync -f {out}")
    compare(f"store tar.zst{suffix}", cont, before=lambda: subprocess.run(["sync"], check=True),
            bare="bare: tar | zstd -T0; sync -f")
    for t in tools:
        os.unlink(os.path.join(b.STORE, f"store-{t.label}"))
    os.unlink(os.path.join(b.STORE, "bare"))


def bench_cycle(tools: List[Tool], suffix: str, tree_bytes: int) -> None:
    image = f"bench{suffix}.zst"
    tools = restore_tools(tools)  # the default config and clear = "mkfs" (issue 23)
    tools[0].run("-b", b.DST, "-r", image, "-u")
    runs: Dict[str, List[dict]] = {t.label: [] for t in tools}
    for r in range(b.ROUNDS):
        for t in (tools if r % 2 == 0 else list(reversed(tools))):
            time.sleep(5)  # the guest finishes booting, so that it answers the power button
            start = time.monotonic()
            laps = phases(t.run("-b", b.DST, "-r", image, "-u", json_out=True))
            laps["total"] = time.monotonic() - start
            runs[t.label].append(laps)
    tools[0].run("-b", b.DST, "-k")
    gib = tree_bytes / 1024 ** 3
    entry = {}
    for label, cycles in runs.items():
        med = {k: statistics.median(c[k] for c in cycles) for k in cycles[0]}
        entry[label] = {"median phases s": med, "runs": cycles,
                        "s per GiB of tree": med["total"] / gib,
                        "total spread s": [min(c["total"] for c in cycles),
                                           max(c["total"] for c in cycles)]}
        print(f"cycle{suffix} {label}: {med['total']:.2f} s, {med['total'] / gib:.2f} s/GiB, "
              + ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total"), flush=True)
    results[f"full cycle -r golden -u{suffix}"] = entry
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", b.DST],
                   capture_output=True)


DEB = "vmim-bench-deb"


def load_debian() -> None:
    """The Debian 12 system (WORK/debian12, made by mmdebstrap) on a slot of its own."""
    disk = os.path.join(b.WORK, "deb.img")
    with open(b.CFG, "a") as fh:
        fh.write(f'[vmim.vm.deb]\nHostName = "{DEB}"\nHostDisk = "{disk}"\npartition = 1\n')
    if not os.path.exists(disk):
        b.make_slot_disk(disk)
    b.vmim("-b", DEB, "--mount")
    stamp = os.path.join(b.mnt(DEB), ".debian12-complete")
    if not os.path.exists(stamp):
        if not os.path.isdir(DEBIAN_DIR):  # built once (about 80 s and 700 MB), then kept
            print("bench: making the Debian 12 system with mmdebstrap (once)", flush=True)
            subprocess.run(["mmdebstrap", "--mode=unshare", "--variant=important",
                            "--include=systemd-sysv,linux-image-amd64", "bookworm",
                            DEBIAN_DIR + ".tmp"], check=True)
            os.rename(DEBIAN_DIR + ".tmp", DEBIAN_DIR)
        b.q("cp", "-a", "--", f"{DEBIAN_DIR}/.", b.mnt(DEB))
        open(stamp, "w").close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="also run the tool as of this git revision")
    parser.add_argument("--debian", action="store_true", help="a Debian 12 system as the tree")
    parser.add_argument("sections", nargs="*",
                        default=["store", "store-tgz", "restore", "cycle"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root")
    b.setup()
    tools = [Tool("vmimagemanager", b.ROOT)]
    if args.base:
        tools.append(Tool(f"vmimagemanager@{args.base}", extract_base(args.base)))
    suffix = "-debian12" if args.debian else ""
    box = DEB if args.debian else b.SRC
    try:
        if args.debian:
            load_debian()
        stats = b.corpus_stats(b.mnt(box))
        results["tree" + suffix] = stats
        print(f"tree{suffix}: {stats['files']} files, {stats['bytes'] / 1024 ** 3:.2f} GiB",
              flush=True)
        for name, flag in ((f"bench{suffix}.zst", "--zstd"), (f"bench{suffix}.tgz", "-z")):
            if not os.path.exists(os.path.join(b.STORE, name)):
                tools[0].run("-b", box, flag, "-s", name)
            if args.base:
                add_sha256(name)
        b.vmim("-b", box, "--release")
        for section in args.sections:
            if section in ("store", "store-tgz"):
                b.vmim("-b", box, "--mount")
                (bench_store if section == "store" else bench_store_tgz)(tools, suffix, box)
                b.vmim("-b", box, "--release")
            elif section == "restore":
                bench_restore(tools, suffix)
            elif section == "cycle":
                bench_cycle(tools, suffix, stats["bytes"])
    finally:
        for name in (b.SRC, b.DST, *([DEB] if args.debian else [])):
            subprocess.run([b.TOOL, "--config", b.CFG, "-q", "-b", name, "-k", "--release"],
                           capture_output=True)
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", b.DST],
                       capture_output=True)
    results["peak RSS MiB"] = {t.label: max(t.rss_kib) / 1024 for t in tools if t.rss_kib}
    results["children peak RSS MiB"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results["machine"] = b.machine()
    out = b.write_results(f"latest-restore{suffix}.json", results)
    print(f"peak RSS: {results['peak RSS MiB']}\nresults: {out}")


if __name__ == "__main__":
    main()
