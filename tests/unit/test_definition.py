"""The definition drift: what libvirt has against what the config would define."""

from __future__ import annotations

from vmim import config
from vmim.definition import domain_xml, drift

CFG = """\
[vmim.vm.a]
HostName = "a"
root = "/srv/a.img"
virt_type = "{virt}"
memory = {memory}
kernel = "/boot/vmlinuz"
"""


def _xml(virt="qemu", memory=262144):
    cfg = config.parse(CFG.format(virt=virt, memory=memory), "/c.cfg")
    return domain_xml(cfg.slot("a"))


def test_the_same_config_has_no_drift():
    assert drift(_xml(), _xml()) == []


def test_each_differing_field_is_named_with_both_values():
    diff = drift(_xml("qemu", 262144), _xml("kvm", 524288))
    assert "domain type kvm, the config says qemu" in diff
    assert "memory 524288 KiB, the config says 262144 KiB" in diff
    assert len(diff) == 2


def test_units_are_compared_not_spelled():
    current = _xml().replace("<memory unit=\"KiB\">262144</memory>",
                             "<memory unit=\"MiB\">256</memory>")
    current = current.replace("<memory unit='KiB'>262144</memory>",
                              "<memory unit='MiB'>256</memory>")
    assert "256" in current
    assert drift(_xml(), current) == []


def test_a_definition_that_does_not_read_is_no_drift_and_no_crash():
    from vmim.definition import drift_of

    cfg = config.parse(CFG.format(virt="qemu", memory=262144), "/c.cfg")
    assert drift_of(cfg.slot("a"), "<domain><name>a</name") == []


def test_a_bare_filesystem_without_a_kernel_is_said_not_to_boot():
    from vmim import config
    from vmim.definition import boot_warning

    cfg = config.parse('[vmim.vm.a]\nHostName = "a"\nroot = "/d/a.img"\n'
                       '[vmim.vm.b]\nHostName = "b"\nroot = "/d/b.img"\nkernel = "/boot/vmlinuz"\n'
                       '[vmim.vm.c]\nHostName = "c"\nHostDisk = "/d/c.img"\npartition = 1\n',
                       "/c.cfg")
    assert boot_warning(cfg.slot("a")) == (
        "box a: defined without a kernel, and its disk is a bare filesystem (no partition "
        "table, no boot loader) that the firmware cannot boot; set kernel (with initrd and "
        "cmdline) for direct kernel boot")
    assert boot_warning(cfg.slot("b")) == "" and boot_warning(cfg.slot("c")) == ""
