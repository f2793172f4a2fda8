"""`make bench-fleet`: the fleet's cost per job, and any-free under concurrency.

1. Overhead: the same job (`-b BOX --mount --release` on a small ext4 slot) run as a local
   command and through the fleet (client → private RabbitMQ node → worker → the same local
   command → reply), alternately, ROUNDS times each; medians and their difference.
2. 50 concurrent `-b any-free --mount --release` clients over 3 workers of 3 slots each: every
   job must succeed, and no two jobs may hold one slot at the same time (checked from the
   workers' journals: start and end of each job per slot).

Runs as root (loop devices, mounts) with rabbitmq-server and kombu installed; everything it
starts (the node, its epmd, the workers) is stopped at the end. Results: bench/results/.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fleet.broker import Broker  # noqa: E402
from tests.fleet.conftest import Fleet, env  # noqa: E402
from tests.integration import diskimages as di  # noqa: E402

ROUNDS = int(os.environ.get("VMIM_BENCH_ROUNDS", "10"))
JOBS = int(os.environ.get("VMIM_BENCH_FLEET_JOBS", "50"))
HOSTS = ("h1", "h2", "h3")


def timed(argv: List[str]) -> float:
    t = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=env())
    took = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({res.returncode}):\n{res.stderr}")
    return took


def overhead(fleet: Fleet) -> Dict[str, float]:
    job = ["-b", "h1a", "--mount", "--release", "-q"]
    local = [sys.executable, "-m", "vmim", "--local", "--config", fleet.configs["h1"], *job]
    remote = [sys.executable, "-m", "vmim", "--broker", fleet.broker.url, *job]
    times: Dict[str, List[float]] = {"local": [], "fleet": []}
    timed(local)
    timed(remote)  # warm caches once
    for r in range(ROUNDS):
        for name in (("local", "fleet") if r % 2 == 0 else ("fleet", "local")):
            times[name].append(timed(local if name == "local" else remote))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"local_s": round(med["local"], 3), "fleet_s": round(med["fleet"], 3),
            "overhead_s": round(med["fleet"] - med["local"], 3), "rounds": ROUNDS,
            "fleet_all_s": [round(x, 3) for x in times["fleet"]],
            "local_all_s": [round(x, 3) for x in times["local"]]}


def concurrent_any_free(fleet: Fleet) -> Dict[str, object]:
    t = time.monotonic()
    procs = [fleet.spawn("-b", "any-free", "--mount", "--release", "--json", "--lock-wait", "600")
             for _ in range(JOBS)]
    outs = [(p.wait(), p.communicate()) for p in procs]
    took = time.monotonic() - t
    codes = [code for code, _ in outs]
    claimed = [json.loads(o)["claimed"] for code, (o, _e) in outs if code == 0]
    overlaps = fleet.overlapping_jobs()
    per_slot = {box: claimed.count(box) for box in sorted(set(claimed))}
    return {"jobs": JOBS, "ok": codes.count(0), "exit_codes": sorted(set(codes)),
            "seconds": round(took, 1), "jobs_per_slot": per_slot,
            "overlapping_jobs": overlaps}


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/fleet.py runs as root (loop devices, mounts)")
    root = tempfile.mkdtemp(prefix="vmim-bench-fleet-")
    os.chmod(root, 0o755)
    broker = Broker(os.path.join(root, "rabbit"))
    os.makedirs(broker.base)
    blank = os.path.join(root, "blank.img")
    di.filesystem_image(blank, "ext4", 16, "blank")
    fleet = Fleet(root, broker)
    os.makedirs(fleet.images)
    os.makedirs(fleet.inserts)
    for h in HOSTS:
        fleet.write_host(h, blank, blank, count=3)
    broker.start()
    result: Dict[str, object] = {}
    try:
        for h in HOSTS:
            fleet.start(h)
        result["overhead"] = overhead(fleet)
        print(json.dumps(result["overhead"]), flush=True)
        result["any_free"] = concurrent_any_free(fleet)
        print(json.dumps(result["any_free"]), flush=True)
    finally:
        for h in list(fleet.workers):
            fleet.stop(h)
        broker.stop()
        for h in HOSTS:
            base = os.path.join(root, h, "mnt")
            subprocess.run(["umount", "-l", base], capture_output=True)
    result["machine"] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                         "python": platform.python_version()}
    out = os.path.join(ROOT, "bench", "results", time.strftime("%Y-%m-%d") + "-fleet.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(f"wrote {out}")
    subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
