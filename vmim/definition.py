"""Domain definition: a small description built from the slot's config, turned into libvirt
domain XML by an XSLT stylesheet (the slot's `hosttransform` or the shipped libvirt.xsl)."""

from __future__ import annotations

import os
import stat
import sys
from typing import Any, List, Optional
from xml.etree import ElementTree as ET

from vmim.config import Slot
from vmim.errors import ConfigError, HostEnvironmentError, StateError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def stylesheet_candidates() -> List[str]:
    """Where the default libvirt.xsl is looked for, first match wins."""
    return [
        "/etc/vmimagemanager/libvirt.xsl",
        os.path.join(sys.prefix, "share", "vmimagemanager", "libvirt.xsl"),
        os.path.join(os.path.dirname(PACKAGE_DIR), "libvirt.xsl"),  # a source tree
    ]


def find_stylesheet(slot: Slot) -> str:
    if slot.hosttransform:
        if not os.path.isfile(slot.hosttransform):
            raise ConfigError(f"box '{slot.name}': hosttransform '{slot.hosttransform}' "
                              "does not exist")
        return slot.hosttransform
    for path in stylesheet_candidates():
        if os.path.isfile(path):
            return path
    raise HostEnvironmentError("libvirt.xsl was not found (looked in "
                               f"{', '.join(stylesheet_candidates())}); reinstall vmimagemanager")


def missing_keys(slot: Slot) -> List[str]:
    """Config keys without which no domain can be defined for the slot."""
    return [] if slot.disk else ["HostDisk or root"]


def describe(slot: Slot) -> str:
    """The domain description (input of the stylesheet) for a slot."""
    missing = missing_keys(slot)
    if missing:
        raise StateError(f"box '{slot.name}' is not defined in libvirt and its config lacks "
                         f"{', '.join(missing)} to define it")
    dom = ET.Element("domain", type=slot.virt_type)
    ET.SubElement(dom, "name").text = slot.name
    ET.SubElement(dom, "memory", unit="KiB").text = str(slot.memory)
    ET.SubElement(dom, "vcpu").text = str(slot.vcpu)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    for key in ("kernel", "initrd", "cmdline"):
        value = getattr(slot, key)
        if value:
            ET.SubElement(os_el, key).text = value
    devices = ET.SubElement(dom, "devices")
    disk_path = slot.disk or ""
    is_block = _is_block(disk_path)
    disk = ET.SubElement(devices, "disk", type="block" if is_block else "file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2" if slot.store_type == "qcow2" else "raw")
    ET.SubElement(disk, "source", attrib={"dev" if is_block else "file": disk_path})
    for mac in slot.mac or ((None,) if slot.bridge else ()):
        iface = ET.SubElement(devices, "interface", type="bridge")
        if mac:
            ET.SubElement(iface, "mac", address=mac)
        ET.SubElement(iface, "source", bridge=slot.bridge or "br0")
    if slot.serial_log:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=slot.serial_log)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return path.startswith("/dev/")


def transform(description: str, stylesheet: str) -> str:
    """Apply the XSLT stylesheet; an unreadable or invalid stylesheet is a config error."""
    try:
        from lxml import etree
    except ImportError as exc:
        raise HostEnvironmentError(f"the Python module 'lxml' cannot be imported ({exc})") from None
    try:
        xslt = etree.XSLT(etree.parse(stylesheet))
    except (etree.XMLSyntaxError, etree.XSLTParseError) as exc:
        raise ConfigError(f"{stylesheet}: {_first_error(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{stylesheet}: cannot read: {exc}") from None
    try:
        result = xslt(etree.fromstring(description.encode()))
    except etree.XSLTApplyError as exc:
        raise ConfigError(f"{stylesheet}: {_first_error(exc)}") from None
    if result.getroot() is None:
        raise ConfigError(f"{stylesheet}: the transformation produced no XML")
    return str(result).strip() + "\n"


def _first_error(exc: Exception) -> str:
    """lxml's error log as one line: the first line number, then every message."""
    entries = list(getattr(exc, "error_log", None) or [])
    if not entries:
        return str(exc)
    line = next((e.line for e in entries if e.line), 0)
    text = "; ".join(dict.fromkeys(e.message for e in entries))
    return f"line {line}: {text}" if line else text


def boot_warning(slot: Slot) -> str:
    """Why a domain defined from slot will not boot by itself, or "": a disk that is a bare
    filesystem (root, a logical volume: no partition table, no boot loader) and no kernel."""
    if slot.kernel or slot.hostdisk:
        return ""
    return (f"box {slot.name}: defined without a kernel, and its disk is a bare filesystem "
            "(no partition table, no boot loader) that the firmware cannot boot; set "
            "kernel (with initrd and cmdline) for direct kernel boot")


def domain_xml(slot: Slot, stylesheet: Optional[str] = None) -> str:
    return transform(describe(slot), stylesheet or find_stylesheet(slot))


#: what the config decides of a definition, compared with what libvirt has (drift)
_DRIFT_FIELDS = (("type", "domain type"), ("memory", "memory"), ("vcpu", "vcpus"),
                 ("os/kernel", "kernel"), ("os/initrd", "initrd"), ("os/cmdline", "cmdline"),
                 ("disk", "disk"))


def _facts(xml: str) -> dict:
    from lxml import etree

    root = etree.fromstring(xml.encode())
    facts = {"type": root.get("type")}
    mem = root.find("memory")
    if mem is not None and mem.text:
        unit = (mem.get("unit") or "KiB").lower()
        scale = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024,
                 "m": 1024, "mib": 1024, "mb": 1e6 / 1024, "g": 1 << 20, "gib": 1 << 20,
                 "gb": 1e9 / 1024}.get(unit, 1)
        facts["memory"] = int(int(mem.text) * scale)
    vcpu = root.find("vcpu")
    facts["vcpu"] = int(vcpu.text) if vcpu is not None and vcpu.text else None
    for key in ("kernel", "initrd", "cmdline"):
        el = root.find(f"os/{key}")
        facts[f"os/{key}"] = el.text if el is not None else None
    facts["disk"] = _source_of(root)
    return facts


def _source_of(root: Any) -> Optional[str]:
    src = root.find("devices/disk[@device='disk']/source")
    return (src.get("file") or src.get("dev")) if src is not None else None


def disk_source(xml: str) -> Optional[str]:
    """The file or device of a definition's first disk (the one the guest boots)."""
    from lxml import etree

    return _source_of(etree.fromstring(xml.encode()))


def with_disk(xml: str, old: str, new: str) -> str:
    """The definition with disk `old` replaced by `new` as the source of its first disk, and
    nothing else changed but what that needs (the disk's type, file or block, and a
    backing chain libvirt recorded for the old one)."""
    from lxml import etree

    root = etree.fromstring(xml.encode())
    src = root.find("devices/disk[@device='disk']/source")
    have = (src.get("file") or src.get("dev")) if src is not None else None
    if src is None or have is None or os.path.normpath(have) != os.path.normpath(old):
        raise StateError(f"the domain's definition names disk {have or 'none'}, not {old}: "
                         "not changed")
    disk = src.getparent()
    block = _is_block(new)
    for attr in ("file", "dev"):
        src.attrib.pop(attr, None)
    src.set("dev" if block else "file", new)
    disk.set("type", "block" if block else "file")
    for chain in disk.findall("backingStore"):
        disk.remove(chain)
    return etree.tostring(root, encoding="unicode")


def drift(wanted_xml: str, current_xml: str) -> List[str]:
    """How libvirt's definition differs from what the config would define, field by field
    ("memory 524288 KiB, the config says 262144 KiB"); [] when they agree."""
    want, have = _facts(wanted_xml), _facts(current_xml)
    out = []
    for key, label in _DRIFT_FIELDS:
        if want.get(key) != have.get(key):
            unit = " KiB" if key == "memory" else ""
            out.append(f"{label} {_shown(have.get(key))}{unit if have.get(key) else ''}, "
                       f"the config says {_shown(want.get(key))}{unit if want.get(key) else ''}")
    return out


def _shown(value: object) -> str:
    return "none" if value in (None, "") else str(value)


def drift_of(slot: Slot, current_xml: Optional[str]) -> List[str]:
    """drift() of the slot's generated definition against libvirt's; [] when either is not
    to be had (a config that cannot define the domain says so when it is defined)."""
    from vmim.errors import VmimError

    if not current_xml:
        return []
    try:
        return drift(domain_xml(slot), current_xml)
    except (VmimError, ValueError, SyntaxError):  # lxml's XMLSyntaxError is a SyntaxError
        return []


def drift_line(box: str, diff: List[str]) -> str:
    return (f"box '{box}': libvirt's definition differs from the config ({'; '.join(diff)}); "
            "--redefine replaces it while the domain is shut off")


def keeping_identity(wanted_xml: str, current_xml: Optional[str]) -> str:
    """wanted_xml with the UUID of libvirt's current definition (libvirt replaces a definition
    only under the same name and UUID)."""
    if not current_xml:
        return wanted_xml
    from lxml import etree

    current = etree.fromstring(current_xml.encode()).findtext("uuid")
    if not current:
        return wanted_xml
    root = etree.fromstring(wanted_xml.encode())
    el = root.find("uuid")
    if el is None:
        el = etree.Element("uuid")
        name = root.find("name")
        root.insert(root.index(name) + 1 if name is not None else 0, el)
    el.text = current
    return etree.tostring(root, encoding="unicode")
