"""Domain definition and lifecycle errors against real libvirtd (no guest boot needed)."""

from __future__ import annotations

import json

from lxml import etree


def _slot_config(write_config, tmp_path, name, extra=""):
    return write_config(f"""\
    [vmim.local]
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    virt_type = "qemu"
    [vmim.vm.a]
    HostName = "{name}"
    HostDisk = "{tmp_path}/a.img"
    partition = 1
    memory = 65536
    vcpu = 2
    mac = ["02:00:00:00:00:0a"]
    bridge = "vmimbr0"
    kernel = "/boot/vmlinuz-test"
    cmdline = "console=ttyS0"
    serial_log = "{tmp_path}/console.log"
    {extra}
    """)


def test_print_xml_shows_the_domain_up_would_define(vmim, write_config, tmp_path, domains):
    name = domains.name("xml")
    cfg = _slot_config(write_config, tmp_path, name)
    r = vmim("-b", name, "--print-xml", "--config", cfg)
    assert r.code == 0, r
    dom = etree.fromstring(r.out.encode())
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == name
    assert dom.find("memory").text == "65536" and dom.findtext("vcpu") == "2"
    assert dom.findtext("os/kernel") == "/boot/vmlinuz-test"
    assert dom.find("features/acpi") is not None
    disk = dom.find("devices/disk")
    assert disk.find("source").get("file") == f"{tmp_path}/a.img"
    assert disk.find("target").get("dev") == "vda" and disk.find("target").get("bus") == "virtio"
    iface = dom.find("devices/interface")
    assert iface.find("mac").get("address") == "02:00:00:00:00:0a"
    assert iface.find("source").get("bridge") == "vmimbr0"
    assert dom.find("devices/serial/source").get("path") == f"{tmp_path}/console.log"
    assert name not in [d.name() for d in domains.conn.listAllDomains()]  # nothing defined
    doc = json.loads(vmim("-b", name, "--print-xml", "--json", "--config", cfg).out)
    assert etree.fromstring(doc["xml"][name].encode()).findtext("name") == name


def test_hosttransform_xslt_error_exits_3_with_file_and_line(vmim, write_config, tmp_path, domains):
    name = domains.name("xslerr")
    xsl = tmp_path / "broken.xsl"
    xsl.write_text('<?xml version="1.0"?>\n'
                   '<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">\n'
                   '  <xsl:template match="/">\n'
                   '    <xsl:value-of/>\n'
                   '  </xsl:template>\n'
                   '</xsl:stylesheet>\n')
    cfg = _slot_config(write_config, tmp_path, name, f'hosttransform = "{xsl}"')
    (tmp_path / "a.img").write_bytes(b"")
    r = vmim("-b", name, "-u", "--config", cfg)
    assert r.code == 3, r
    assert str(xsl) in r.err and "line 4" in r.err and "select is missing" in r.err
    assert name not in [d.name() for d in domains.conn.listAllDomains()]


def test_a_start_libvirt_refuses_exits_1_with_its_message(vmim, write_config, tmp_path, domains):
    name = domains.track(domains.name("nokernel"))
    cfg = _slot_config(write_config, tmp_path, name)
    text = open(cfg).read().replace('bridge = "vmimbr0"\n', "").replace(
        'mac = ["02:00:00:00:00:0a"]\n', "")
    open(cfg, "w").write(text)
    r = vmim("-b", name, "-u", "--config", cfg)
    assert r.code == 1, r
    assert "libvirt could not start the domain" in r.err
    assert "vmlinuz-test" in r.err or "a.img" in r.err
    assert domains.state(name) == 5  # defined, not running


def test_domain_unknown_to_libvirt_without_a_disk_in_the_config(vmim, write_config, tmp_path, domains):
    name = domains.name("nodisk")
    cfg = write_config(f"""\
    [vmim.local]
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    [vmim.vm.a]
    HostName = "{name}"
    """)
    r = vmim("-b", name, "-u", "--config", cfg)
    assert r.code == 4, r
    assert "not defined in libvirt" in r.err and "HostDisk or root" in r.err


def test_down_and_kill_of_a_slot_libvirt_does_not_know(vmim, write_config, tmp_path, domains):
    name = domains.name("ghost")
    cfg = _slot_config(write_config, tmp_path, name)
    r = vmim("-b", name, "-d", "-k", "--json", "--config", cfg)
    assert r.code == 0, r
    steps = json.loads(r.out)["results"][0]["steps"]
    assert [s["step"] for s in steps] == ["kill", "down"]
    assert "not defined in libvirt" in steps[0]["message"]


def test_existing_domains_are_never_redefined(vmim, write_config, tmp_path, domains):
    name = domains.define(domains.name("keep"), memory_mib=48)
    cfg = _slot_config(write_config, tmp_path, name)
    (tmp_path / "a.img").write_bytes(b"\0" * 1024)
    r = vmim("-b", name, "-u", "--config", cfg)  # starts the existing definition
    assert r.code == 0, r
    xml = domains.conn.lookupByName(name).XMLDesc(0)
    assert "<memory unit='KiB'>49152</memory>" in xml  # its own 48 MiB, not the config's
    assert "differs from the config" in r.err and "memory 49152 KiB" in r.err  # but said
    assert vmim("-b", name, "-k", "--config", cfg).code == 0


def test_redefine_replaces_a_drifted_definition_only_while_shut_off(vmim, write_config,
                                                                    tmp_path, domains):
    name = domains.define(domains.name("redef"), memory_mib=48, start=True)
    cfg = _slot_config(write_config, tmp_path, name)
    (tmp_path / "a.img").write_bytes(b"\0" * 1024)
    dry = vmim("-b", name, "--redefine", "--dry-run", "--config", cfg)
    r = vmim("-b", name, "--redefine", "--config", cfg)
    assert r.code == dry.code == 4, (dry, r)
    assert "only while the domain is shut off" in r.err
    assert "<memory unit='KiB'>49152</memory>" in domains.conn.lookupByName(name).XMLDesc(0)
    r = vmim("-b", name, "-k", "--redefine", "--json", "--config", cfg)
    assert r.code == 0, r
    xml = domains.conn.lookupByName(name).XMLDesc(0)
    assert "<memory unit='KiB'>65536</memory>" in xml and "/boot/vmlinuz-test" in xml
    step = json.loads(r.out)["results"][0]["steps"][-1]
    assert step["step"] == "redefine" and "memory 49152 KiB" in step["message"]
    r = vmim("-l", "--config", cfg)
    assert "differs from the config" not in r.err
