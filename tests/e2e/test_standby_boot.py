"""Re-imaging with the downtime of one reboot (issue 24): a real guest runs while the next
image is staged into its standby disk, and the next -u boots it — raw and qcow2 slots."""

from __future__ import annotations

import os

from tests.e2e.conftest import wait_for_line, wait_for_state
from tests.e2e.test_full_cycle import _tgz
from tests.guest import console_lines
from tests.integration import diskimages as di


def _partitioned(path: str, marker: str) -> None:
    di.partitioned_image(path, "dos", [24], ["ext4"])
    with di.attached(path, di.MiB) as dev, di.mounted(dev) as mp:
        with open(os.path.join(mp, "marker"), "w") as fh:
            fh.write(marker + "\n")


def _config(write_config, tmp_path, guest, name, disk_lines):
    return write_config(f"""\
    [vmim.local]
    vmimages = "{tmp_path}/images"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    mount = "{tmp_path}/mnt"
    virt_type = "qemu"
    [vmim.vm.guest]
    HostName = "{name}"
    {disk_lines}
    memory = 262144
    timeout = 60
    kernel = "{guest.kernel}"
    initrd = "{guest.initrd}"
    cmdline = "console=ttyS0 quiet vmim.mode=acpi"
    serial_log = "{tmp_path}/console.log"
    """)


def _boots_with(console: str, marker: str) -> None:
    """The guest booted from a disk whose /marker is marker (each disk has its own)."""
    wait_for_line(console, f"VMIM-FILE /marker: {marker}")


def test_a_raw_slot_is_re_imaged_with_one_reboot(vmim, guest, domains, tmp_path, write_config):
    os.chmod(tmp_path, 0o755)
    (tmp_path / "images").mkdir()
    _tgz(tmp_path / "images" / "golden", {"marker": b"staged golden\n"})
    disk, spare = str(tmp_path / "disk.img"), str(tmp_path / "standby.img")
    _partitioned(disk, "first")
    _partitioned(spare, "spare")
    name = domains.track(domains.name("stage"))
    cfg = _config(write_config, tmp_path, guest, name,
                  f'HostDisk = "{disk}"\n    standby = "{spare}"\n    partition = 1')
    console = str(tmp_path / "console.log")
    assert vmim("-b", name, "-u", "--config", cfg).code == 0
    _boots_with(console, "first")

    r = vmim("-b", name, "-r", "golden", "--stage", "--config", cfg)
    assert r.code == 0, r
    assert domains.state(name) == 1  # the guest ran through the staging
    assert "VMIM-FILE /marker: staged golden" not in console_lines(console)
    r = vmim("-b", name, "-u", "--config", cfg)
    assert r.code == 0, r
    _boots_with(console, "staged golden")
    dom = domains.conn.lookupByName(name)
    assert f"<source file='{spare}'" in dom.XMLDesc(0)
    dom.destroy()
    wait_for_state(domains, name, 5)


def test_a_qcow2_slot_is_re_imaged_with_one_reboot(vmim, guest, domains, tmp_path,
                                                   write_config):
    os.chmod(tmp_path, 0o755)
    (tmp_path / "images").mkdir()
    di.qcow2_golden(str(tmp_path / "images" / "first"), "first qcow2")
    di.qcow2_golden(str(tmp_path / "images" / "golden"), "staged qcow2")
    disk = str(tmp_path / "slot.qcow2")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G")
    name = domains.track(domains.name("stageq"))
    cfg = _config(write_config, tmp_path, guest, name, f'HostDisk = "{disk}"')
    console = str(tmp_path / "console.log")
    assert vmim("-b", name, "-r", "first", "-u", "--config", cfg).code == 0
    _boots_with(console, "first qcow2")

    r = vmim("-b", name, "-r", "golden", "--stage", "-u", "--config", cfg)
    assert r.code == 0, r
    _boots_with(console, "staged qcow2")
    dom = domains.conn.lookupByName(name)
    assert f"<source file='{tmp_path}/slot.standby.qcow2'" in dom.XMLDesc(0)
    assert not os.path.exists(disk)  # the old overlay on "first" is gone
    dom.destroy()
    wait_for_state(domains, name, 5)
