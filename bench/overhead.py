"""`bench/overhead.py`: the fixed cost of a restore, outside its clear and its transfer.

    bench/overhead.py --base REV [--debian] [--rounds N]

The clear and the unpack are the bare tools' work and vary by a second between runs of the
same command on a disk that other writes share; what the tool adds (its start, the lock,
libvirt, the plan, the proof of the image, the mount, the choice of the clear, the end of the
pipeline) is a few tenths of a second inside that noise. So this measures it directly: the
wall time of `vmimagemanager -b dst -r IMAGE --json` minus the clear, transfer and delete laps
of its own timings (and, beside it, the wall time and the transfer: the same restore by two
revisions, alternated, is the closest comparison of their unpacks that the disk's noise
allows), for this tree and for the tool at git revision REV, alternated, on the
slot and images of `make bench` (bench/restore.py made them: the corpus's tar.zst, or
Debian 12's with --debian). Medians and each run's value are printed and written to
bench/results/latest-overhead[-debian12].json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import restore as r  # noqa: E402  (its Tool, base extraction and settle)
import run as b  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the tool as of this git revision")
    parser.add_argument("--debian", action="store_true", help="Debian 12's image, not the corpus")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root")
    b.setup()
    suffix = "-debian12" if args.debian else ""
    image = f"bench{suffix}.zst"
    if not os.path.exists(os.path.join(b.STORE, image)):
        raise SystemExit(f"bench: {image} is not in {b.STORE}: run bench/restore.py first")
    tools = [r.Tool("vmimagemanager", b.ROOT),
             r.Tool(f"vmimagemanager@{args.base}", r.extract_base(args.base))]
    runs: Dict[str, List[dict]] = {t.label: [] for t in tools}
    for i in range(args.rounds):
        for t in (tools if i % 2 == 0 else list(reversed(tools))):
            r.settle()
            start = time.monotonic()
            doc = t.run("-b", b.DST, "-r", image, json_out=True)
            wall = time.monotonic() - start
            laps = r.phases(doc)
            heavy = sum(laps.get(k, 0.0) for k in ("clear", "transfer", "delete"))
            steps = {s["step"]: s["seconds"] for s in doc["results"][0]["steps"]}
            runs[t.label].append({"wall s": wall, "outside s": wall - heavy, "laps": laps,
                                  "steps": steps})
    out = {}
    for label, rs in runs.items():
        med = statistics.median(x["outside s"] for x in rs)
        wall = [x["wall s"] for x in rs]
        transfer = [x["laps"].get("transfer", 0.0) for x in rs]
        out[label] = {"median outside clear and transfer s": med,
                      "median wall s": statistics.median(wall),
                      "median transfer s": statistics.median(transfer), "runs": rs}
        print(f"restore {image} {label}: outside clear and transfer {med:.3f} s "
              f"[{min(x['outside s'] for x in rs):.3f}-{max(x['outside s'] for x in rs):.3f}]; "
              f"wall {statistics.median(wall):.2f} s [{min(wall):.2f}-{max(wall):.2f}], "
              f"transfer {statistics.median(transfer):.2f} s "
              f"[{min(transfer):.2f}-{max(transfer):.2f}]", flush=True)
    print(f"results: {b.write_results(f'latest-overhead{suffix}.json', out)}")


if __name__ == "__main__":
    main()
