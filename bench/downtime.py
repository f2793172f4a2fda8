"""`bench/downtime.py`: the downtime of re-imaging a running guest, today's path against the
staged one (issue 24), in one run, on the slots and corpus of `make bench` (bench/run.py).

    bench/downtime.py [--debian]

A slot with a standby disk runs the booting test guest of the e2e tests (it powers off when
the power button is pressed). For each image (a small tree, the /usr corpus, and with --debian
the Debian 12 system of bench/restore.py), alternately ROUNDS times:

- restore: `-b stage -r IMAGE -u` on the running guest (the path without a standby);
- staged: `-b stage -r IMAGE --stage` (the guest runs), then `-b stage -u`;
- reboot: `-b stage -d`, then `-b stage -u` (a graceful shutdown and a start, nothing else).

Downtime is what the guest sees: from the shutdown request to the domain started again, the
sum of the `--json` step times from `down` to `up` (the proof of the image, before `down`,
is not downtime). What a staging costs the running guest is measured on the host: the read
throughput of the guest's disk file (`dd iflag=direct`, 1 GiB) alone and while a staging of
the corpus runs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as b  # noqa: E402  (the set-up, slots and corpus of `make bench`)

BOX = "vmim-bench-stage"
results: Dict[str, dict] = {}


def add_slot(guest) -> None:
    """The staging slot: dst-like, with a standby disk, the guest in acpi mode."""
    disk, spare = os.path.join(b.WORK, "stage.img"), os.path.join(b.WORK, "stage-standby.img")
    for path in (disk, spare):
        if not os.path.exists(path):
            b.make_slot_disk(path)
    with open(b.CFG, "a") as fh:
        fh.write(f"""[vmim.vm.stage]
HostName = "{BOX}"
HostDisk = "{disk}"
standby = "{spare}"
partition = 1
memory = 262144
timeout = 60
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
cmdline = "console=ttyS0 quiet vmim.mode=acpi"
serial_log = "{b.WORK}/stage-console.log"
""")


def downtime(doc: dict) -> Dict[str, float]:
    """Seconds of each step from `down` to `up`, and their sum."""
    steps = doc["results"][0]["steps"]
    names = [s["step"] for s in steps]
    first = names.index("down")
    out: Dict[str, float] = {}
    for s in steps[first:]:
        out[s["step"]] = out.get(s["step"], 0.0) + s["seconds"]
    out["downtime"] = sum(s["seconds"] for s in steps[first:])
    return out


def running_guest() -> None:
    """The guest is up and answers the power button (it has booted)."""
    b.vmim("-b", BOX, "-u")
    time.sleep(5)


def contenders(image: str) -> Dict[str, callable]:
    def restore() -> dict:
        running_guest()
        return downtime(b.vmim("-b", BOX, "-r", image, "-u", json_out=True))

    def staged() -> dict:
        running_guest()
        t = time.monotonic()
        b.vmim("-b", BOX, "-r", image, "--stage")
        staging = time.monotonic() - t
        return {**downtime(b.vmim("-b", BOX, "-u", json_out=True)), "staging (guest up)": staging}

    def reboot() -> dict:
        running_guest()
        d = b.vmim("-b", BOX, "-d", json_out=True)
        u = b.vmim("-b", BOX, "-u", json_out=True)
        return {"down": d["results"][0]["steps"][0]["seconds"],
                "up": u["results"][0]["steps"][-1]["seconds"],
                "downtime": d["results"][0]["steps"][0]["seconds"] +
                sum(s["seconds"] for s in u["results"][0]["steps"])}

    return {"restore -r IMAGE -u": restore, "staged --stage, then -u": staged,
            "reboot -d, then -u": reboot}


def measure(label: str, image: str, tree: dict) -> None:
    runs: Dict[str, List[dict]] = {}
    cont = contenders(image)
    for r in range(b.ROUNDS):
        for name in (list(cont) if r % 2 == 0 else list(reversed(cont))):
            runs.setdefault(name, []).append(cont[name]())
    med = {name: {k: statistics.median(x[k] for x in v) for k in v[0]}
           for name, v in runs.items()}
    reboot = med["reboot -d, then -u"]["downtime"]
    results[label] = {"tree": tree, "image bytes": os.path.getsize(os.path.join(b.STORE, image)),
                      "median s": med, "runs": runs,
                      "staged downtime minus reboot s":
                      med["staged --stage, then -u"]["downtime"] - reboot}
    print(f"{label}: " + ", ".join(f"{n} {m['downtime']:.2f} s" for n, m in med.items()) +
          f" (staging itself {med['staged --stage, then -u']['staging (guest up)']:.1f} s)",
          flush=True)


def guest_disk_cost(image: str) -> None:
    """Host read throughput of the running guest's disk file, alone and beside a staging."""
    running_guest()
    active = json.loads(subprocess.run([b.TOOL, "--config", b.CFG, "-l", "--json"],
                                       capture_output=True, text=True).stdout)
    disk = next(r["disk"] for r in active["boxes"] if r["name"] == BOX)

    def read_rate() -> float:
        t = time.monotonic()
        subprocess.run(["dd", f"if={disk}", "of=/dev/null", "bs=1M", "count=1024",
                        "iflag=direct"], check=True, capture_output=True)
        return 1024 / (time.monotonic() - t)

    alone = [read_rate() for _ in range(b.ROUNDS)]
    beside: List[float] = []
    for _ in range(b.ROUNDS):
        stager = threading.Thread(target=b.vmim, args=("-b", BOX, "-r", image, "--stage"))
        stager.start()
        time.sleep(1)  # the staging is under way (its proof, then its unpack)
        beside.append(read_rate())
        stager.join()
    results["guest disk read MiB/s"] = {
        "alone": statistics.median(alone), "beside a staging": statistics.median(beside),
        "runs": {"alone": alone, "beside a staging": beside}}
    print(f"guest disk read: alone {statistics.median(alone):.0f} MiB/s, beside a staging "
          f"{statistics.median(beside):.0f} MiB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debian", action="store_true", help="also the Debian 12 system")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root")
    guest = b.setup()
    add_slot(guest)
    import restore as r  # bench/restore.py: the Debian 12 slot

    try:
        small = os.path.join(b.STORE, "stage-small.zst")
        if not os.path.exists(small):  # a small tree: /usr/share/doc of the corpus
            b.shell(f"tar -cf - -C {b.mnt(b.SRC)}/usr_share doc | zstd -q -T0 > {small}")
        if not os.path.exists(os.path.join(b.STORE, "bench.zst")):
            b.vmim("-b", b.SRC, "--zstd", "-s", "bench.zst")
        trees = {"small (/usr/share/doc)": ("stage-small.zst",
                                           b.corpus_stats(f"{b.mnt(b.SRC)}/usr_share/doc")),
                 "/usr corpus": ("bench.zst", b.corpus_stats(b.mnt(b.SRC)))}
        if args.debian:
            r.load_debian()
            if not os.path.exists(os.path.join(b.STORE, "bench-debian12.zst")):
                b.vmim("-b", r.DEB, "--zstd", "-s", "bench-debian12.zst")
            trees["Debian 12"] = ("bench-debian12.zst", b.corpus_stats(b.mnt(r.DEB)))
            b.vmim("-b", r.DEB, "--release")
        b.vmim("-b", b.SRC, "--release")
        for label, (image, tree) in trees.items():
            measure(label, image, tree)
        guest_disk_cost("bench.zst")
    finally:
        subprocess.run([b.TOOL, "--config", b.CFG, "-q", "-b", BOX, "-k", "--release"],
                       capture_output=True)
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", BOX],
                       capture_output=True)
        for name in (b.SRC, *([r.DEB] if args.debian else [])):
            subprocess.run([b.TOOL, "--config", b.CFG, "-q", "-b", name, "--release"],
                           capture_output=True)
    results["machine"] = b.machine()
    print(f"results: {b.write_results('latest-downtime.json', results)}")


if __name__ == "__main__":
    main()
