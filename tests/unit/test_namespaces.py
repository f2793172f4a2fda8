"""Pure parts of the mount-namespace checks (issue 12, hole 2): mountinfo's propagation tags,
the mount base of a slot, QEMU's guest name, and the message naming a holder. The real
reproduction (a QEMU pinning a mount) is tests/integration/test_mount_namespaces.py."""

from __future__ import annotations

from vmim.disk import mounts, namespaces


def test_mountinfo_optional_fields_say_which_mounts_are_shared():
    text = ("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
            "50 27 254:0 /mnt/vm /mnt/vm rw shared:7 - ext4 /dev/vda rw\n"
            "51 50 7:0 / /mnt/vm/web rw shared:8 master:3 - ext4 /dev/loop0 rw\n"
            "52 27 7:1 / /srv rw master:3 - ext4 /dev/loop1 rw\n")
    ms = mounts.parse_mountinfo(text)
    assert [m.shared for m in ms] == [False, True, True, False]  # a pure slave is not shared
    assert ms[2].tags == ("shared:8", "master:3") and ms[0].tags == ()
    assert ms[1].root == ms[1].target == "/mnt/vm"  # a directory bound onto itself


def test_mount_base_is_the_prefix_or_the_slots_parent():
    assert mounts.mount_base("/mnt/vm/web1", "/mnt/vm/") == "/mnt/vm"
    assert mounts.mount_base("/mnt/vm/deep/web1", "/mnt/vm") == "/mnt/vm"
    assert mounts.mount_base("/srv/slots/web1", "/mnt/vm/") == "/srv/slots"  # its own mount
    assert mounts.mount_base("/mnt/vm", "/mnt/vm") == "/mnt"
    assert mounts.mount_base("/mnt/vmx/web1", "/mnt/vm") == "/mnt/vmx"  # not below /mnt/vm


def test_guest_name_from_a_qemu_command_line():
    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-S"]
    assert namespaces.guest_name(qemu) == "web1"
    assert namespaces.guest_name(["qemu", "-name", "guest=a,,b,debug-threads=on"]) == "a,b"
    assert namespaces.guest_name(["qemu", "-name", "old-style"]) == "old-style"
    assert namespaces.guest_name(["qemu", "-name", "process=x,debug-threads=on"]) is None
    assert namespaces.guest_name(["qemu", "-m", "32"]) is None
    assert namespaces.guest_name(["qemu", "-name"]) is None


def test_holder_message_names_pid_domain_and_what_to_do():
    qemu = namespaces.Holder(4242, "qemu-system-x86", "web1", "/mnt/vm/web1", "/dev/loop3")
    other = namespaces.Holder(99, "unshare", None, "/mnt/vm/web1", "/dev/loop3")
    text = namespaces.describe([qemu, other])
    assert "/dev/loop3 is mounted at /mnt/vm/web1 in the mount namespace of pid 4242 " \
           "(qemu-system-x86, libvirt domain 'web1')" in text
    assert "shut down domain 'web1' (which pinned the mount when it started)" in text
    assert "'nsenter -t 4242 -m umount /mnt/vm/web1'" in text
    assert "stop pid 99 (unshare)" in text
    assert "again" not in text


def test_no_holders_for_devices_that_do_not_exist():
    assert namespaces.mounts_elsewhere(["/dev/does-not-exist", "/etc/hostname"]) == []
