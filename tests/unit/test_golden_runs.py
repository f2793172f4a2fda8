"""Golden output of whole local runs, and the fleet's rendering of the same reports.

Each run of RUNS is the command line on a small site (libvirt's own test driver, whose domain
`test` is running, and a slot `web1` libvirt does not know): its stdout with `--dry-run` or the
lists as text is tests/plans/runs/NAME.txt, with `--json` NAME.json. The fleet renders the report
a worker sends (vmim.fleet.protocol, decoded as a client reads it) with the same renderer
(vmim.output): the same text, a HOST column in front of a list's table; the same JSON, each
document, result and list row carrying its "host". After a wanted change,
`pytest tests/unit/test_golden_runs.py --regenerate-output` rewrites the files (review the diff).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import pytest

from vmim import __version__, output
from vmim.fleet import client, gather, protocol

RUNS_DIR = Path(__file__).parent.parent / "plans" / "runs"
HOST = "hv1"
#: the site's directory as the golden files show it: as long as mkdtemp's, so tables keep
#: their alignment
SITE = "/tmp/vmim-golden-XXXXXXXX"
MTIME = 1577934245  # 2020-01-02 03:04:05 UTC: the images' date

#: name -> (box arguments, list arguments); dry runs and lists change nothing
RUNS = {
    "down": ["-b", "test", "--down", "--dry-run"],
    "kill-up": ["-b", "test", "-k", "-u", "--dry-run"],
    "two-boxes-down-up": ["-b", "test", "-b", "web1", "--down", "-u", "--dry-run"],
    "any-free-up": ["-b", "any-free", "-u", "--dry-run"],
    "lists": ["-l", "-L", "--list-inserts", "-f", "-m"],
}


@pytest.fixture
def site():
    path = tempfile.mkdtemp(prefix="vmim-golden-", dir="/tmp")
    assert len(path) == len(SITE), path
    for d in ("images", "inserts", "locks", "state"):
        os.mkdir(os.path.join(path, d), 0o755)
    for store, name in (("images", "golden"), ("inserts", "certs")):
        with tarfile.open(os.path.join(path, store, name), "w") as tar:
            info = tarfile.TarInfo("etc/hostname")
            data = name.encode() + b"\n"
            info.size, info.mtime = len(data), MTIME
            tar.addfile(info, io.BytesIO(data))
    for box in ("test", "web1"):
        with open(os.path.join(path, f"{box}.img"), "wb") as fh:
            fh.truncate(1 << 20)
    for top, dirs, files in os.walk(path):
        for n in dirs + files:
            os.utime(os.path.join(top, n), (MTIME, MTIME))
    cfg = os.path.join(path, "vmim.cfg")
    with open(cfg, "w") as fh:
        fh.write(f"""[vmim.local]
vmemulator = "test:///default"
lockdir = "{path}/locks"
statedir = "{path}/state"
vmimages = "{path}/images"
vminserts = "{path}/inserts"
[vmim.vm.test]
HostName = "test"
root = "{path}/test.img"
[vmim.vm.web1]
HostName = "web1"
root = "{path}/web1.img"
""")
    yield path
    shutil.rmtree(path)


def _golden(text: str, path: str) -> str:
    return text.replace(path, SITE).replace(f'"version": "{__version__}"', '"version": "@VERSION@"')


def _run(vmim, site: str, name: str, *more: str):
    r = vmim("--config", os.path.join(site, "vmim.cfg"), *RUNS[name], *more)
    assert "error" not in r.err, r
    return r


def _check(name: str, got: str, regenerate: bool) -> None:
    path = RUNS_DIR / name
    if regenerate:
        RUNS_DIR.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run with --regenerate-output"
    assert got == path.read_text()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_local_run_prints_its_golden_text_and_json(vmim, site, name, regenerate):
    text = _run(vmim, site, name)
    doc = _run(vmim, site, name, "--json")
    assert text.code == doc.code
    _check(f"{name}.txt", _golden(text.out, site), regenerate)
    _check(f"{name}.json", _golden(doc.out, site), regenerate)


def test_every_golden_run_file_has_a_run():
    assert sorted(p.name for p in RUNS_DIR.iterdir()) == \
        sorted(f"{n}.{ext}" for n in RUNS for ext in ("txt", "json"))


# --------------------------------------------------------------------------- the fleet's


def _worker_doc(vmim, site: str, argv: List[str]) -> Dict[str, Any]:
    """What a worker's child prints for a job or a list request: the local run's JSON."""
    r = vmim("--config", os.path.join(site, "vmim.cfg"), *argv, "--json")
    return json.loads(r.out)


def _as_received(reply: protocol.Reply) -> protocol.Reply:
    """Through the wire: encoded by the worker, decoded by the client."""
    return protocol.decode_reply(reply.encode())


def _golden_doc(name: str, site: str) -> Dict[str, Any]:
    text = (RUNS_DIR / f"{name}.json").read_text().replace(SITE, site)
    return json.loads(text.replace('"@VERSION@"', json.dumps(__version__)))


def _boxes_of(argv: List[str]) -> List[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-b"]


@pytest.mark.parametrize("name", [n for n in sorted(RUNS) if "-b" in RUNS[n]])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_the_fleet_renders_a_jobs_report_as_the_local_run_plus_its_host(vmim, site, name,
                                                                        as_json):
    argv = RUNS[name]
    results = []
    for box in _boxes_of(argv):  # one job a box, as the client sends them
        rest = [a for i, a in enumerate(argv) if a != "-b" and (i == 0 or argv[i - 1] != "-b")]
        doc = dict(_worker_doc(vmim, site, ["-b", box, *rest]), host=HOST)
        results.append(_as_received(protocol.Reply("result", HOST, box=box,
                                                   exit_code=doc["exit_code"], doc=doc)))
    out = io.StringIO()
    doc: Dict[str, Any] = {"version": __version__}
    code = client.report_results(results, doc, as_json, out)
    if not as_json:
        want = (RUNS_DIR / f"{name}.txt").read_text().replace(SITE, site)
        assert out.getvalue() == want
        return
    assert out.getvalue() == ""
    want = _golden_doc(name, site)
    assert code == want.pop("exit_code")
    # one job: its "host"; several: "hosts", one a job, in order
    hosts = {"host": HOST} if len(results) == 1 else {"hosts": [HOST] * len(results)}
    assert doc == dict(want, **hosts)


def _with_host_column(text: str) -> str:
    """The golden lists' tables with a HOST column in front: what the fleet prints (-f's
    names, one a line here, become a table of HOST and NAME)."""
    tables: List[List[List[str]]] = []
    for line in text.splitlines():
        cells = re.split(r"  +", line.rstrip())
        if line.startswith("NAME  ") or len(cells) < len(tables[-1][0]):
            tables.append([cells] if line.startswith("NAME  ") else [["NAME"], cells])
        else:
            tables[-1].append(cells)
    out = io.StringIO()
    for rows in tables:
        output.table(["HOST", *rows[0]], [[HOST, *r] for r in rows[1:]], out)
    return out.getvalue()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_the_fleet_renders_lists_as_the_local_run_plus_its_host(vmim, site, as_json):
    argv = RUNS["lists"]
    doc = _worker_doc(vmim, site, argv)
    reply = _as_received(protocol.Reply("lists", HOST, exit_code=doc["exit_code"], doc=doc))
    lists = ["boxes", "images", "inserts", "free", "locked"]
    out = io.StringIO()
    got: Dict[str, Any] = {}
    gather.report_lists(lists, {HOST: reply}, got, out, as_json)
    if not as_json:
        local = (RUNS_DIR / "lists.txt").read_text().replace(SITE, site)
        assert out.getvalue() == _with_host_column(local)
        return
    want = _golden_doc("lists", site)
    assert got == {
        "hosts": [HOST],
        "boxes": [dict(r, host=HOST) for r in want["boxes"]],
        "images": [dict(r, host=HOST, hosts=[HOST]) for r in want["images"]],
        "inserts": [dict(r, host=HOST, hosts=[HOST]) for r in want["inserts"]],
        "free": want["free"], "free_by_host": {HOST: want["free"]},
        "locked": [dict(r, host=HOST) for r in want["locked"]],
    }
