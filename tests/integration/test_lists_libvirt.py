"""Lists and box validation against a real libvirtd."""

from __future__ import annotations

import json

from tests.conftest import table_rows


def _config(write_config, slots):
    text = '[vmim.local]\nvmemulator = "qemu:///system"\n'
    for i, (name, disk) in enumerate(slots):
        text += f'[vmim.vm.{i}]\nHostName = "{name}"\nHostDisk = "{disk}"\npartition = 1\n'
    return write_config(text)


def test_list_boxes_unites_config_and_libvirt_with_states(vmim, write_config, domains):
    only_libvirt = domains.define(domains.name("libvirt-only"), start=True)
    both = domains.define(domains.name("both"))
    only_config = domains.name("config-only")
    path = _config(write_config, [(both, "/srv/disks/both.img"), (only_config, "/srv/disks/c.img")])

    r = vmim("-l", "--config", path)
    assert r.code == 0, r
    rows = {row[0]: row for row in table_rows(r.out)}
    assert rows[only_libvirt][1:] == ("no", "running", "no", "no", "-", "-", "no", "-")
    assert rows[both][1:] == ("yes", "shut off", "no", "no",
                              "/srv/disks/both.img (partition 1) (missing)", "-", "no", "-")
    assert rows[only_config][1:3] == ("yes", "undefined")

    doc = json.loads(vmim("-l", "--json", "--config", path).out)
    boxes = {b["name"]: b for b in doc["boxes"]}
    assert boxes[only_libvirt]["in_config"] is False
    assert boxes[only_libvirt]["domain"] == {"defined": True, "state": "running", "persistent": True}
    assert boxes[both]["domain"]["state"] == "shut off"
    assert boxes[both]["store_type"] == "kpartx"
    assert boxes[both]["disk"] == "/srv/disks/both.img"
    assert boxes[only_config]["domain"]["defined"] is False
    assert boxes[only_config]["section"] == "vmim.vm.1"


def test_list_boxes_of_a_legacy_config_with_unquoted_values(vmim, write_config, domains):
    name = domains.define(domains.name("legacy"))
    path = write_config(f"""\
    [VmImageManager]
    virthost = qemu:///system
    vmimages = /srv/images
    [{name}]
    vm_slot_enabled = yes
    root = /srv/disks/legacy.img
    [disabled-slot]
    vm_slot_enabled = no
    root = /srv/disks/disabled.img
    """)
    doc = json.loads(vmim("-l", "--json", "--config", path).out)
    boxes = {b["name"]: b for b in doc["boxes"]}
    assert boxes[name]["in_config"] and boxes[name]["domain"]["state"] == "shut off"
    assert boxes[name]["disk"] == "/srv/disks/legacy.img"
    assert "disabled-slot" not in boxes


def test_unknown_box_exits_4_listing_the_known_boxes(vmim, write_config, domains):
    known_domain = domains.define(domains.name("known"))
    path = _config(write_config, [("slot-in-config", "/srv/disks/s.img")])
    r = vmim("-b", "nosuch", "-d", "--config", path)
    assert r.code == 4, r
    assert "unknown box 'nosuch'" in r.err
    assert "slot-in-config" in r.err and known_domain in r.err
    assert domains.state(known_domain) == 5  # nothing happened to the domain (shut off)


def test_restore_without_an_image_store_names_the_key(vmim, write_config, domains):
    name = domains.define(domains.name("nostore"))
    path = _config(write_config, [(name, "/srv/disks/nostore.img")])
    r = vmim("-b", name, "-r", "golden", "--config", path)
    assert r.code == 3, r
    assert "no image store configured: set vmimages" in r.err


def test_a_user_without_access_to_the_running_daemon_is_told_what_is_missing(tmp_path):
    """libvirtd runs; a non-root user outside the libvirt group cannot connect. The message
    says root or the libvirt group, not 'is libvirtd running?' (libvirt's own text speaks of
    a missing system bus)."""
    import os
    import sys

    from tests.conftest import as_user

    os.chmod(tmp_path, 0o755)
    cfg = tmp_path / "c.cfg"
    cfg.write_text('[vmim.local]\nvmemulator = "qemu:///system"\n')
    os.chmod(cfg, 0o644)
    res = as_user([sys.executable, "-m", "vmim", "--config", str(cfg), "-l"], "/")
    assert res.returncode == 7, res.stderr
    assert "as a member of the 'libvirt' group" in res.stderr
    assert "is libvirtd running" not in res.stderr


def test_a_definition_that_drifted_from_the_config_is_said_in_one_line(vmim, write_config,
                                                                       domains):
    """libvirt's definition differs from what the config would define (here: memory, domain
    type): -l says so in one line per box and in --json; a box that agrees says nothing."""
    drifted = domains.define(domains.name("drift"), memory_mib=48)
    path = write_config(f"""\
    [vmim.local]
    vmemulator = "qemu:///system"
    virt_type = "qemu"
    [vmim.vm.0]
    HostName = "{drifted}"
    root = "/srv/disks/drift.img"
    memory = 262144
    """)
    r = vmim("-l", "--config", path)
    assert r.code == 0, r
    lines = [line for line in r.err.splitlines() if "differs from the config" in line]
    assert len(lines) == 1, r.err
    assert f"box '{drifted}'" in lines[0] and "memory 49152 KiB, the config says 262144 KiB" \
        in lines[0] and "--redefine" in lines[0]
    doc = json.loads(vmim("-l", "--json", "--config", path).out)
    box = next(b for b in doc["boxes"] if b["name"] == drifted)
    assert any(d.startswith("memory 49152 KiB") for d in box["definition_drift"])
