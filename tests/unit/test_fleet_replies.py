"""A fleet client reads the documents workers send — a job's result, a host's lists — only in
the shape vmim.fleet.protocol declares: whatever JSON a peer on the broker sends, the client
prints text or exits 7 naming the host, never a traceback. And the renderer (vmim.output)
draws any JSON value as text."""

from __future__ import annotations

import json
import random
from typing import Any, Dict

import pytest

from tests.unit.test_terminal_depth import fleet_of  # noqa: F401 - the fixture
from vmim import output
from vmim.fleet import protocol
from vmim.listing import BoxRow
from vmim.lock import Holder
from vmim.plan import Plan, Step, Verdict
from vmim.standby import Staged
from vmim.store import Entry

STAGED = {"image": "img", "started": "2026-12-06T00:00:00", "finished": "2026-12-06T00:10:00",
          "state": "ready", "skip": None}
BOX = {"name": "hx1", "in_config": True, "section": "vmim.vm.hx1",
       "domain": {"defined": True, "state": "shut off", "persistent": True},
       "store_type": "rsync", "disk": "/d/hx1.img", "disk_missing": False,
       "definition_drift": [], "mount": "/m/hx1", "mounted": False,
       "locked": {"pid": 4, "command": "sleep 9"}, "base": None,
       "incomplete": {"image": "img", "started": "?"}, "standby": "/d/hx1.spare",
       "staged": STAGED}
ENTRY = {"name": "img", "directory": "/s", "path": "/s/img", "format": "tgz", "size": 10,
         "mtime": "2026-12-06T00:00:00", "base_of": ["hx1"]}
LISTS = {"boxes": [BOX], "images": [ENTRY], "inserts": [ENTRY], "free": ["hx1"],
         "locked": [{"name": "hx1", "pid": 4, "command": "sleep 9"}]}

BAD_LISTS: Dict[str, Dict[str, Any]] = {
    "base_of": {"images": [dict(ENTRY, base_of=[1])]},
    "staged.finished": {"boxes": [dict(BOX, staged=dict(STAGED, finished=5))]},
    "hosts": {"boxes": [dict(BOX, hosts=[1])]},
    "host": {"images": [dict(ENTRY, host=["x"])]},
    "size": {"images": [dict(ENTRY, size=10**400)]},
    "path": {"images": [dict(ENTRY, path=["x"])]},
    "free": {"free": [1]},
    "locked": {"locked": [{"name": "hx1", "pid": "4", "command": 3}]},
    "row": {"boxes": [1]},
    "domain": {"boxes": [dict(BOX, domain=[])]},
    "list": {"inserts": {"name": "x"}},
}


def lists_reply(doc: Dict[str, Any], code: int = 0) -> Dict[str, Any]:
    return {"type": "lists", "host": "hx", "exit_code": code, "doc": doc, "stderr": []}


def test_lists_of_the_declared_shape_print(vmim, fleet_of):  # noqa: F811
    fleet_of(protocol.CONTROL, [{"type": "here", "host": "hx"}, lists_reply(LISTS)])
    r = vmim("--broker", "amqp://nowhere", "-l", "-L", "--list-inserts", "-f", "-m")
    assert r.code == 0, r
    assert "restore of img" in r.out and "img 2026-12-06T00:10" in r.out and "10 B" in r.out


@pytest.mark.parametrize("name", sorted(BAD_LISTS))
def test_lists_of_another_shape_are_exit_7_naming_the_host(vmim, fleet_of, name):  # noqa: F811
    fleet_of(protocol.CONTROL, [{"type": "here", "host": "hx"},
                                lists_reply(dict(LISTS, **BAD_LISTS[name]))])
    r = vmim("--broker", "amqp://nowhere", "-l", "-L", "--list-inserts", "-f", "-m")
    assert r.code == 7, r
    assert "the lists from host hx" in r.err, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err


PLAN = {"steps": [{"step": "mount", "description": "mount it", "implicit": False}],
        "expected_exit_code": 0}
BAD_RESULTS: Dict[str, Dict[str, Any]] = {
    "results": {"results": ["x", 1]},
    "steps": {"plan": {"hx1": dict(PLAN, steps="down")}},
    "step": {"plan": {"hx1": dict(PLAN, steps=[{"step": 1, "description": "d"}])}},
    "expected_exit_code": {"plan": {"a": dict(PLAN, expected_exit_code=None),
                                    "b": dict(PLAN, expected_exit_code=3)}},
    "expected_error": {"plan": {"hx1": dict(PLAN, expected_error=["x"])}},
    "xml": {"xml": {"hx1": 5}},
    "claimed": {"claimed": 5},
    "error": {"error": "x"},
    "big": {"plan": {"hx1": dict(PLAN, expected_exit_code=10**400)}},
}


@pytest.mark.parametrize("name", sorted(BAD_RESULTS))
def test_results_of_another_shape_are_exit_7_naming_the_host(vmim, fleet_of, name):  # noqa: F811
    fleet_of(protocol.JOBS, [{"type": "result", "host": "hx", "box": "hx1", "exit_code": 0,
                              "doc": BAD_RESULTS[name], "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-b", "hx1", "--mount", "--dry-run")
    assert r.code == 7, r
    assert "the result from host hx" in r.err, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err


def test_a_result_of_the_declared_shape_prints(vmim, fleet_of):  # noqa: F811
    fleet_of(protocol.JOBS, [{"type": "result", "host": "hx", "box": "hx1", "exit_code": 4,
                              "doc": {"plan": {"hx1": dict(PLAN, expected_exit_code=4,
                                                           expected_error="no")},
                                      "expected_exit_code": 4, "results": []},
                              "stderr": []}])
    r = vmim("--broker", "amqp://nowhere", "-b", "hx1", "--mount", "--dry-run")
    assert r.code == 4, r
    assert "1. mount: mount it" in r.out and "(exit 4): no" in r.out, r.out


def test_a_host_name_with_a_control_is_a_malformed_reply():
    for host in ("h\n1", "h\x1b1", "h\x9b1"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_reply(json.dumps({"v": protocol.VERSION, "type": "here",
                                              "host": host}))


def test_the_documents_of_this_release_have_the_declared_shape():
    """What a worker's child writes: rows, entries, plans, as their classes make them."""
    row = BoxRow("hx1", True, "vmim.vm.hx1", "shut off", True, "rsync", "/d", "/d", "/m",
                 True, Holder(4, "sleep 9"), "base", {"image": "i", "started": "?", "pid": 3,
                                                      "box": "hx1", "disk": "/d"},
                 False, True, ("memory",), "/d2", Staged("img", "s", "f"))
    entry = Entry("img", "/s", "tgz", 10, 0.0, ("hx1",))
    plan = Plan("hx1", (Step("mount", "m", standby=True), Step("up", "u", True)),
                Verdict(4, "no"))
    lists = {"version": "1", "exit_code": 0, "boxes": [row.as_dict()],
             "images": [entry.as_dict()], "inserts": [], "free": ["hx1"],
             "locked": [{"name": "hx1", **Holder(4, "x").as_dict()}]}
    result = {"version": "1", "exit_code": 4, "plan": {"hx1": plan.as_dict()},
              "expected_exit_code": 4, "results": [{"box": "hx1"}], "claimed": "hx1",
              "host": "hx", "xml": {"hx1": "<domain/>"},
              "error": {"message": "m", "exit_code": 4, "type": "StateError"}}
    for kind, doc in (("lists", lists), ("result", result)):
        r = protocol.Reply(kind, "hx", exit_code=4, doc=doc)
        assert protocol.decode_reply(r.encode()) == r


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "big", "float", "str"] + (["list", "dict"] * (depth < 3))
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "big":
        return 10 ** rng.randint(20, 400)
    if kind == "float":
        return rng.uniform(-1e300, 1e300)
    if kind == "str":
        return rng.choice(["", "x", "a\nb", "\x1b[2J", "T"])
    if kind == "list":
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["name", "size", "base_of", "staged", "finished", "image", "skip", "state",
            "domain", "locked", "pid", "incomplete", "mtime", "steps", "step", "description",
            "expected_error", "expected_exit_code", "disk", "command"]
    return {rng.choice(keys): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def test_the_renderer_draws_any_json_value_as_text():
    import io

    rng = random.Random(7)
    for _ in range(3000):
        rows = [_json_value(rng) for _ in range(rng.randint(0, 3))]
        for what in ("boxes", "images", "inserts", "free", "locked"):
            for hosts in (None, [_json_value(rng) for _ in rows]):
                output.render_list(what, rows, io.StringIO(), hosts=hosts)
        output.render_plans([Plan.from_dict("b", _json_value(rng))], 0, io.StringIO())
