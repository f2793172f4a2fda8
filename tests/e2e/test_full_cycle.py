"""One command does the whole job on a guest that really boots."""

from __future__ import annotations

import io
import os
import tarfile

from tests.e2e.conftest import wait_for_line, wait_for_state
from tests.guest import console_lines


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_restore_insert_and_boot_in_one_command(vmim, make_slot, domains, tmp_path):
    images, inserts = tmp_path / "images", tmp_path / "inserts"
    images.mkdir()
    inserts.mkdir()
    _tgz(images / "golden", {"marker": b"golden image\n"})
    _tgz(inserts / "certs", {"etc/ssl/host.pem": b"-----BEGIN CERTIFICATE----- test\n"})
    slot = make_slot("report", extra=f'vmimages = "{images}"\n        vminserts = "{inserts}"',
                     report="/marker,/etc/ssl/host.pem")
    r = vmim("-b", slot.name, "-u", "-i", "certs", "-r", "golden", "--config", slot.cfg)
    assert r.code == 0, r
    lines = wait_for_line(slot.console, "VMIM-GUEST: poweroff")
    assert "VMIM-FILE /marker: golden image" in lines
    assert "VMIM-FILE /etc/ssl/host.pem: -----BEGIN CERTIFICATE----- test" in lines
    wait_for_state(domains, slot.name, 5)


def test_missing_image_leaves_the_box_down_and_released(vmim, make_slot, domains, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    slot = make_slot("report", extra=f'vmimages = "{images}"')
    r = vmim("-b", slot.name, "-r", "nosuch", "-u", "--config", slot.cfg)
    assert r.code == 4, r
    assert "image 'nosuch' not found" in r.err and "the domain was not started" in r.err
    assert slot.name not in [d.name() for d in domains.conn.listAllDomains()]
    assert console_lines(slot.console) == []
    assert not os.path.ismount(slot.mount)


def test_guest_boots_from_a_fresh_qcow2_overlay(vmim, guest, domains, tmp_path, write_config):
    from tests.integration import diskimages as di

    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    di.qcow2_golden(str(images / "golden"), "golden qcow2 base")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "slot.qcow2"), "1G")
    name = domains.track(domains.name("overlay"))
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    virt_type = "qemu"
    [vmim.vm.q]
    HostName = "{name}"
    HostDisk = "{tmp_path}/slot.qcow2"
    memory = 262144
    kernel = "{guest.kernel}"
    initrd = "{guest.initrd}"
    cmdline = "console=ttyS0 quiet vmim.mode=report"
    serial_log = "{tmp_path}/console.log"
    """)
    r = vmim("-b", name, "-r", "golden", "-u", "--config", cfg)
    assert r.code == 0, r
    lines = wait_for_line(str(tmp_path / "console.log"), "VMIM-GUEST: poweroff")
    assert "VMIM-FILE /marker: golden qcow2 base" in lines
    wait_for_state(domains, name, 5)
    assert "type='qcow2'" in domains.conn.lookupByName(name).XMLDesc(0)


def test_guest_boots_from_a_tree_restored_into_a_qcow2_overlay(vmim, guest, domains, tmp_path,
                                                               write_config):
    """-r of a tgz into a qcow2 slot goes through its FUSE export into the overlay; the base
    stays as it was, and the guest boots what was restored."""
    import hashlib

    from tests.integration import diskimages as di
    from tests.rig import storage_daemons

    def sha256(path):
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    di.qcow2_golden(str(images / "base"), "golden qcow2 base", virtual="1G")
    before = sha256(images / "base")
    di.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(images / "base"), "-F", "qcow2",
           str(tmp_path / "slot.qcow2"))
    _tgz(images / "tree", {"marker": b"tree in the overlay\n"})
    name = domains.track(domains.name("qtree"))
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    lockdir = "{tmp_path}/locks"
    mount = "{tmp_path}/mnt"
    virt_type = "qemu"
    [vmim.vm.q]
    HostName = "{name}"
    HostDisk = "{tmp_path}/slot.qcow2"
    partition = 1
    memory = 262144
    kernel = "{guest.kernel}"
    initrd = "{guest.initrd}"
    cmdline = "console=ttyS0 quiet vmim.mode=report"
    serial_log = "{tmp_path}/console.log"
    """)
    r = vmim("-b", name, "-r", "tree", "-u", "--config", cfg)
    assert r.code == 0, r
    assert storage_daemons() == set()  # released before the boot
    lines = wait_for_line(str(tmp_path / "console.log"), "VMIM-GUEST: poweroff")
    assert "VMIM-FILE /marker: tree in the overlay" in lines
    wait_for_state(domains, name, 5)
    assert sha256(images / "base") == before


def test_a_slot_from_its_config_alone_boots(vmim, guest, domains, tmp_path, write_config):
    """Three lines of slot config and no disk: -r golden -u makes the disk (disksize), restores
    into it, defines the domain through libvirt.xsl and boots it."""
    os.chmod(tmp_path, 0o755)  # QEMU runs as libvirt-qemu
    images = tmp_path / "images"
    images.mkdir()
    _tgz(images / "golden", {"marker": b"made from the config alone\n"})
    name = domains.track(domains.name("new"))
    disk = tmp_path / "disks" / "new.img"
    disk.parent.mkdir()
    os.chmod(disk.parent, 0o755)
    cfg = write_config(f"""\
    [vmim.local]
    vmimages = "{images}"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    mount = "{tmp_path}/mnt"
    virt_type = "qemu"
    memory = 262144
    kernel = "{guest.kernel}"
    initrd = "{guest.initrd}"
    cmdline = "console=ttyS0 quiet vmim.mode=report vmim.report=/marker"
    [vmim.vm.new]
    HostName = "{name}"
    HostDisk = "{disk}"
    partition = 1
    disksize = "64M"
    serial_log = "{tmp_path}/console.log"
    """)
    assert not disk.exists()
    r = vmim("-b", name, "-r", "golden", "-u", "--config", cfg)
    assert r.code == 0, r
    lines = wait_for_line(str(tmp_path / "console.log"), "VMIM-GUEST: poweroff")
    assert "VMIM-FILE /marker: made from the config alone" in lines
    wait_for_state(domains, name, 5)
