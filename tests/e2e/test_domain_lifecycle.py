"""-u, -d, -k on a real guest that boots: definition through libvirt.xsl, ACPI shutdown,
forced shutdown of a guest that ignores ACPI, release before start."""

from __future__ import annotations

import json
import subprocess
import time

from tests.e2e.conftest import console_lines, wait_for_line, wait_for_state  # noqa: F401
from vmim.disk import loop, mounts


def test_up_defines_the_domain_through_libvirt_xsl_and_the_guest_boots(vmim, make_slot, domains):
    slot = make_slot("report")
    r = vmim("-b", slot.name, "-u", "-v", "--config", slot.cfg)
    assert r.code == 0, r
    assert "defined from the config" in r.err and "started" in r.err
    lines = wait_for_line(slot.console, "VMIM-GUEST: poweroff")
    assert "VMIM-ROOT: mounted /dev/vda1" in lines
    assert "VMIM-FILE /marker: slot marker" in lines
    wait_for_state(domains, slot.name, 5)
    xml = domains.conn.lookupByName(slot.name).XMLDesc(0)
    assert "<acpi/>" in xml and "dev='vda' bus='virtio'" in xml and "type='qemu'" in xml


def test_down_of_a_guest_that_honours_acpi(vmim, make_slot, domains):
    slot = make_slot("acpi")
    assert vmim("-b", slot.name, "-u", "--config", slot.cfg).code == 0
    wait_for_line(slot.console, "VMIM-GUEST: waiting")
    r = vmim("-b", slot.name, "-d", "-v", "--timeout", "60", "--config", slot.cfg)
    assert r.code == 0, r
    assert "shut down in" in r.err and "forcing" not in r.err
    assert "VMIM-GUEST: power button" in console_lines(slot.console)
    assert domains.state(slot.name) == 5


def test_down_of_a_guest_that_ignores_acpi_is_forced_after_the_timeout(vmim, make_slot, domains):
    slot = make_slot("ignore")
    assert vmim("-b", slot.name, "-u", "--config", slot.cfg).code == 0
    wait_for_line(slot.console, "VMIM-GUEST: waiting (ignoring ACPI)")
    started = time.monotonic()
    r = vmim("-b", slot.name, "-d", "--timeout", "3", "--config", slot.cfg)
    assert r.code == 0, r
    assert time.monotonic() - started >= 3
    assert "did not shut down within 3 s; forcing it off" in r.err
    assert domains.state(slot.name) == 5


def test_down_of_a_paused_guest_resumes_it_to_shut_it_down(vmim, make_slot, domains):
    slot = make_slot("acpi")
    assert vmim("-b", slot.name, "-u", "--config", slot.cfg).code == 0
    wait_for_line(slot.console, "VMIM-GUEST: waiting")
    domains.conn.lookupByName(slot.name).suspend()
    assert domains.state(slot.name) == 3
    r = vmim("-b", slot.name, "-d", "--timeout", "60", "--config", slot.cfg)
    assert r.code == 0, r
    assert "VMIM-GUEST: power button" in console_lines(slot.console)
    assert domains.state(slot.name) == 5


def test_up_twice_is_a_no_op_and_kill_forces_off(vmim, make_slot, domains):
    slot = make_slot("ignore", extra="vcpu = 1")
    assert vmim("-b", slot.name, "-u", "--core", "2", "--config", slot.cfg).code == 0
    dom = domains.conn.lookupByName(slot.name)
    assert dom.info()[3] == 2  # --core set the vCPUs before the start
    r = vmim("-b", slot.name, "-u", "-v", "--json", "--config", slot.cfg)
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "up")
    assert step["step"] == "up" and step["message"] == "already running"
    r = vmim("-b", slot.name, "-k", "--config", slot.cfg)
    assert r.code == 0 and domains.state(slot.name) == 5


def test_up_while_mounted_releases_the_disk_first(vmim, make_slot, domains):
    slot = make_slot("report")
    assert vmim("-b", slot.name, "--mount", "--config", slot.cfg).code == 0
    assert mounts.mounted_at(slot.mount) is not None
    r = vmim("-b", slot.name, "-u", "-v", "--config", slot.cfg)
    assert r.code == 0, r
    assert "unmounted" in r.err
    assert mounts.mounted_at(slot.mount) is None
    assert loop.loops_backed_by(slot.disk) == []
    lines = wait_for_line(slot.console, "VMIM-GUEST: poweroff")
    assert "VMIM-FILE /marker: slot marker" in lines
    wait_for_state(domains, slot.name, 5)


def test_up_is_refused_when_the_disk_cannot_be_released(vmim, make_slot, domains, monkeypatch):
    monkeypatch.setattr(mounts, "UMOUNT_RETRY_DELAYS", (0.1,))
    slot = make_slot("report")
    assert vmim("-b", slot.name, "--mount", "--config", slot.cfg).code == 0
    holder = subprocess.Popen(["sleep", "60"], cwd=slot.mount)
    try:
        r = vmim("-b", slot.name, "-u", "--config", slot.cfg)
        assert r.code == 8, r
        assert f"pid {holder.pid}" in r.err
        # released first, so never defined nor started
        assert slot.name not in [d.name() for d in domains.conn.listAllDomains()]
        assert console_lines(slot.console) == []  # never booted
    finally:
        holder.kill()
        holder.wait()
    assert vmim("-b", slot.name, "--release", "--config", slot.cfg).code == 0
