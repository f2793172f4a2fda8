"""The standby disk without a hypervisor: the config key, the request's parts, the plan of a
staging and a swap, the definition's disk change, which disk is active (vmim.standby)."""

from __future__ import annotations

import json
import os

import pytest

from vmim import config, standby
from vmim.definition import disk_source, with_disk
from vmim.errors import ConfigError, ProtocolError, StateError
from vmim.plan import Observed, plan_box, plan_staged
from vmim.request import Request, Transfer


def load(write_config, body: str, local: str = ""):
    return config.load(write_config(f"[vmim.local]\n{local}\n[vmim.vm.a]\nHostName = \"a\"\n"
                                    + body))


def test_the_standby_key_and_its_mount(write_config):
    cfg = load(write_config, 'HostDisk = "/d/a.img"\npartition = 1\nstandby = "/d/a2.img"\n',
               'mount = "/mnt/vm"')
    slot = cfg.slot("a")
    assert slot.standby_disk == "/d/a2.img" and slot.standby_mount == "/mnt/vm/a.standby"
    q = load(write_config, 'HostDisk = "/d/q.qcow2"\n').slot("a")
    assert q.standby_disk == "/d/q.standby.qcow2"  # a qcow2 slot needs no key
    assert load(write_config, 'HostDisk = "/d/a.img"\n').slot("a").standby_disk is None


def test_a_standby_that_is_the_slots_own_disk_is_refused(write_config):
    with pytest.raises(ConfigError, match="the slot's own disk"):
        load(write_config, 'root = "/d/a.img"\nstandby = "/d/../d/a.img"\n')


def test_a_standby_that_is_another_slots_disk_or_mount_conflicts(write_config):
    cfg = config.load(write_config('[vmim.local]\nmount = "/m"\n'
                                   '[vmim.vm.a]\nHostName = "a"\nroot = "/d/a.img"\n'
                                   'standby = "/d/b.img"\n'
                                   '[vmim.vm.b]\nHostName = "b"\nroot = "/d/b.img"\n'
                                   '[vmim.vm.c]\nHostName = "a.standby"\nroot = "/d/c.img"\n'))
    assert "is also a disk of slot 'a'" in (cfg.slot("b").conflict or "")
    assert "mount point of slot 'a'" in (cfg.slot("a.standby").conflict or "")


@pytest.mark.parametrize("actions,problem", [
    (("store",), "needs -r NAME"),
    (("restore", "store"), "store works on the active disk"),
    (("restore", "mount"), "mount works on the active disk"),
    (("restore", "release"), "release works on the active disk"),
])
def test_what_stage_does_not_go_with(actions, problem):
    req = Request(boxes=("a",), actions=actions, stage=True, restore="x" if
                  "restore" in actions else None, store="y" if "store" in actions else None)
    assert problem in (req.stage_problem() or "")
    with pytest.raises(ProtocolError):
        Request.from_dict(req.to_dict())


def test_a_staged_request_splits_into_the_standby_part_and_the_swap():
    req = Request(boxes=("a",), actions=("down", "restore", "insert", "up"), restore="g",
                  inserts=(Transfer("certs", "/"),), stage=True)
    assert Request.from_dict(req.to_dict()) == req
    assert req.staging().actions == ("restore", "insert", "release")
    assert not req.staging().stage
    swap = req.swapping()
    assert swap.actions == ("down", "swap", "up") and swap.restore is None and not swap.inserts


SEEN = Observed(domain_state="running", in_config=True, disk="/d/a.img", mount="/m/a",
                store_type="partition", images={"g": "tar.zst"}, standby="/d/b.img")
SPARE = Observed(domain_state="undefined", in_config=True, disk="/d/b.img",
                 mount="/m/a.standby", store_type="partition", images={"g": "tar.zst"})


def test_the_plan_of_a_staging_and_its_swap():
    req = Request(boxes=("a",), actions=("restore", "up"), restore="g", stage=True)
    plan = plan_staged(req, "a", SEEN, SPARE)
    assert plan.verdict is None
    assert [(s.name, s.standby) for s in plan.steps] == [
        ("verify", True), ("mount", True), ("restore", True), ("release", True),
        ("down", False), ("swap", False), ("release", False), ("up", False)]
    assert "mount it at /m/a.standby" in plan.steps[1].description
    assert '"disk": "standby"' in json.dumps(plan.as_dict())
    # a staging alone leaves the domain as it is
    alone = plan_staged(Request(boxes=("a",), actions=("restore",), restore="g", stage=True),
                        "a", SEEN, SPARE)
    assert [s.name for s in alone.steps] == ["verify", "mount", "restore", "release"]
    assert all(s.standby for s in alone.steps)


def test_up_swaps_what_is_ready_and_says_why_not_otherwise():
    up = Request(boxes=("a",), actions=("up",))
    ready = plan_box(up, "a", Observed(**{**SEEN.__dict__, "staged": "g"}))
    assert [s.name for s in ready.steps] == ["down", "swap", "release", "up"]
    assert ready.steps[1].implicit
    skip = plan_box(up, "a", Observed(**{**SEEN.__dict__, "staged_skip": "it did not finish"}))
    assert [s.name for s in skip.steps] == ["release", "up"]
    assert "not swapped in: it did not finish" in skip.steps[-1].description
    # a restore into the active disk in the same command: no swap
    restore = Request(boxes=("a",), actions=("restore", "up"), restore="g")
    assert "swap" not in [s.name for s in plan_box(
        restore, "a", Observed(**{**SEEN.__dict__, "staged": "g"})).steps]


def test_swap_verdicts():
    swap = Request(boxes=("a",), actions=("swap",))
    none = plan_box(swap, "a", Observed(**{**SEEN.__dict__, "staged_skip": "stale"}))
    assert none.verdict and none.verdict.exit_code == 4 and "stale" in none.verdict.message
    nostandby = plan_box(swap, "a", Observed(**{**SEEN.__dict__, "standby": None}))
    assert nostandby.verdict and nostandby.verdict.exit_code == 3


XML = """<domain type='kvm'><name>a</name><uuid>u</uuid><memory>1024</memory>
<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='/d/a.img'/><backingStore/><target dev='vda' bus='virtio'/></disk>
<interface type='bridge'><mac address='52:54:00:00:00:01'/></interface></devices></domain>"""


def test_the_swap_changes_the_disk_source_and_nothing_else():
    out = with_disk(XML, "/d/a.img", "/d/b.img")
    assert disk_source(out) == "/d/b.img"
    assert "52:54:00:00:00:01" in out and "<uuid>u</uuid>" in out and "vda" in out
    assert "backingStore" not in out
    with pytest.raises(StateError, match="names disk /d/a.img, not /d/x.img"):
        with_disk(XML, "/d/x.img", "/d/b.img")


def test_which_disk_is_active(write_config, tmp_path):
    state = tmp_path / "state"
    cfg = load(write_config, 'root = "/d/a.img"\nstandby = "/d/b.img"\n',
               f'statedir = "{state}"')
    slot = cfg.slot("a")
    assert standby.active_disk(cfg, slot, None) == "/d/a.img"  # nothing says otherwise
    assert standby.active_disk(cfg, slot, XML.replace("/d/a.img", "/d/b.img")) == "/d/b.img"
    os.makedirs(state, mode=0o755)
    standby.swapped(cfg, "a", "/d/b.img")
    assert standby.active_disk(cfg, slot, None) == "/d/b.img"  # the record, with no definition
    assert standby.active_disk(cfg, slot, XML) == "/d/a.img"  # the definition wins
    # a record naming a third disk is no disk of the slot: HostDisk/root
    standby.swapped(cfg, "a", "/etc/shadow")
    assert standby.active_disk(cfg, slot, None) == "/d/a.img"
    active, spare = standby.resolve_slot(cfg, slot, XML.replace("/d/a.img", "/d/b.img"))
    assert (active.disk, spare.disk, spare.name, spare.mount) == (
        "/d/b.img", "/d/a.img", "a/standby", slot.mount + ".standby")
    assert active.standby_disk == "/d/a.img" and spare.standby_disk is None
    q = load(write_config, 'HostDisk = "/d/q.qcow2"\n', f'statedir = "{state}"').slot("a")
    active, spare = standby.resolve_slot(cfg, q, None)
    assert (active.disk, spare.disk, spare.standby_disk) == (
        "/d/q.qcow2", "/d/q.standby.qcow2", None)
