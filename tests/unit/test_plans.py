"""Golden plans: one expected-output file per scenario under tests/plans/, as virt-manager keeps
its CLI compare files. A change of behaviour shows up as a diff of a text file; after a wanted
change, `pytest tests/unit/test_plans.py --regenerate-output` rewrites them (review the diff).

The plans are pure (vmim.plan): each scenario is an observed state written out here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmim.plan import Observed, Request, Transfer, plan_box

PLANS = Path(__file__).parent.parent / "plans"

SLOT = dict(in_config=True, disk="/srv/web1.img (partition 1)", mount="/mnt/vm/web1",
            store_type="kpartx")
IMAGES = {"golden": "tar.zst", "tree": "rsync"}
INSERTS = {"certs": "tgz"}


def _seen(state="shut off", **kw):
    # golden: stored by this tool, its digest recorded (a tree is not: rsync-restore-mkfs)
    base = dict(SLOT, domain_state=state, images=IMAGES, inserts=INSERTS, checksum=True)
    base.update(kw)
    return Observed(**base)


def _req(*actions, **kw):
    return Request(boxes=["web1"], actions=list(actions), **kw)


FULL = dict(restore="golden", inserts=[Transfer("certs", "/")])

SCENARIOS = {
    "off": [(_req("restore", "insert", "up", **FULL), _seen())],
    "running": [(_req("restore", "insert", "up", **FULL), _seen("running"))],
    "running-down-mount": [(_req("down", "mount"), _seen("running"))],
    # the image is proven before the domain asked to stop is stopped
    "running-kill-restore": [(_req("kill", "restore", "up", restore="golden"),
                              _seen("running"))],
    "running-mount-refused": [(_req("mount"), _seen("running"))],
    "mounted": [(_req("store", "release", store="snap", format="tgz"), _seen(mounted=True))],
    "mounted-and-running": [(_req("restore", "up", restore="golden"),
                             _seen("running", mounted=True))],
    "mounted-and-running-kill-release": [(_req("kill", "release"),
                                          _seen("running", mounted=True))],
    "locked": [(_req("restore", restore="golden"), _seen(locked_by="pid 42 (vmimagemanager)"))],
    "missing-image": [(_req("restore", "up", restore="gone"),
                       _seen(images={"gone": "missing"}, checksum=False,
                             unusable=("image 'gone' not found in /srv/images; similar: "
                                       "golden",)))],
    "missing-insert": [(_req("insert", inserts=[Transfer("keys", "/root")]),
                        _seen(inserts={"keys": "missing"},
                              unusable=("insert 'keys' not found in /srv/inserts",)))],
    "no-image-store": [(_req("store", store="snap"), _seen(missing_stores=("vmimages",)))],
    "several-boxes": [(_req("extract", "store", extracts=[Transfer("logs-{box}", "/var/log")],
                            store="{box}-snap", format="tar.zst"), _seen()),
                      (_req("extract", "store", extracts=[Transfer("logs-{box}", "/var/log")],
                            store="{box}-snap", format="tar.zst"), _seen("running"))],
    "rsync-restore-mkfs": [(_req("restore", "up", restore="tree"),
                            _seen(clear="mkfs", checksum=False))],
    "restore-clear-delete": [(_req("restore", restore="golden"), _seen(clear="delete"))],
    "restore-clear-mkfs": [(_req("restore", restore="golden"), _seen(clear="mkfs"))],
    "incomplete-up": [(_req("up"), _seen(incomplete="golden"))],
    "create-disk": [(_req("restore", "up", restore="golden"), _seen(
        "undefined", create="make /srv/web1.img: a sparse 20.0 GiB raw file, an MBR partition "
        "table with partition 1, an ext4 filesystem"))],
    "shared-mount-point": [(_req("mount"), _seen(
        conflict="/etc/vmim.cfg: [vmim.vm.web2] mount '/mnt/vm/web1' is also the mount point "
                 "of slot 'web1' ([vmim.vm.web1]); releasing one would unmount the other: "
                 "give each slot its own"))],
    "incomplete-restore-up": [(_req("restore", "up", restore="golden"),
                               _seen(incomplete="golden"))],
    "pinned": [(_req("mount"), _seen(pinned="/dev/loop3 is mounted at /mnt/vm/web1 in the mount "
                                     "namespace of pid 7 (qemu-system-x86, libvirt domain "
                                     "'web2')"))],
    "qcow2-reset": [(_req("restore", "up", restore="base"),
                     _seen(store_type="qcow2", disk="/srv/ci3.qcow2",
                           images={"base": "qcow2"}))],
    "qcow2-tree-store-and-insert": [(_req("store", "insert", store="snap", format="tgz",
                                          inserts=[Transfer("certs", "/")]),
                                     _seen(store_type="qcow2", disk="/srv/ci3.qcow2"))],
    "qcow2-archive-restore": [(_req("restore", restore="golden"),
                               _seen(store_type="qcow2", disk="/srv/ci3.qcow2", mounted=True))],
    "disk-image-restore-mounted": [(_req("mount", "restore", restore="golden", disk_image=True),
                                    _seen(store_type="partition", disk="/srv/web1.img",
                                          images={"golden": "raw"}))],
    "libvirt-only-up": [(_req("up"), Observed(domain_state="shut off", in_config=False))],
    "libvirt-only-locked": [(_req("kill"), Observed(domain_state="running", in_config=False,
                                                    locked_by="pid 42 (vmimagemanager)"))],
    "not-root-up": [(_req("up"), _seen(root=False))],
    "pinned-up": [(_req("up"), _seen(pinned="/dev/loop3 is mounted at /mnt/vm/web1 in the "
                                     "mount namespace of pid 7 (qemu-system-x86)"))],
    "libvirt-only-mount": [(_req("mount"), Observed(domain_state="shut off", in_config=False))],
    "held-by-qemu": [(_req("restore", "up", restore="golden"),
                      _seen(held_by="disk '/srv/web1.img' is in use by another process: pid 7 "
                            "(qemu-system-x86_64, domain 'web2') holds QEMU's lock on it"))],
}


def render(name: str) -> str:
    out = []
    plans = []
    for i, (req, seen) in enumerate(SCENARIOS[name]):
        box = "web1" if i == 0 else f"web{i + 1}"
        plans.append(plan_box(req, box, seen))
    for p in plans:
        out.append(p.text())
    out.append(f"exit {max(p.expected_exit for p in plans)}\n")
    return "".join(out)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_plan_matches_its_golden_file(name, regenerate):
    path = PLANS / f"{name}.txt"
    got = render(name)
    if regenerate:
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run with --regenerate-output"
    assert got == path.read_text()


def test_every_golden_file_has_a_scenario():
    assert sorted(p.stem for p in PLANS.glob("*.txt")) == sorted(SCENARIOS)


@pytest.mark.parametrize("code", [3, 4, 5, 7, 8])
def test_a_verdict_ends_the_real_run_with_its_own_exit_code(code):
    from vmim.plan import Verdict
    from vmim.runner import error_of

    assert error_of(Verdict(code, "why")).exit_code == code


def test_the_digest_is_checked_beside_only_a_mount_and_restore_that_come_next():
    def verify(req, seen):
        return next(s for s in plan_box(req, "web1", seen).steps if s.name == "verify")

    restore = _req("restore", "up", restore="golden")
    assert verify(restore, _seen()).beside
    assert not verify(restore, _seen(checksum=False)).beside  # a full read, at once
    assert not verify(restore, _seen("running")).beside  # a shutdown comes next
    assert not verify(_req("store", "restore", store="snap", restore="golden"), _seen()).beside
    assert not verify(restore, _seen(create="a new 10 GiB raw disk")).beside
