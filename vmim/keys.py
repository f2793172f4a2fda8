"""The configuration's key table: every key once, with its type, scope, default and help.
It drives parsing (vmim.config, vmim.configread), --print-config, the template and the config reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from vmim.words import DiskFormat, StoreType

STORE_TYPES: Tuple[StoreType, ...] = tuple(StoreType)
TRUE_WORDS = ("yes", "y", "on", "1", "true")
FALSE_WORDS = ("no", "n", "off", "0", "false")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    scope "local": only in [vmim.local]; scope "slot": in a slot section, and (when
    `inherit`) also in [vmim.local] as the default for every slot.
    """

    attr: str
    ini: str
    type: str  # str, path, int, bool, list, choice
    scope: str
    help: str
    default: Any = None
    aliases: Tuple[str, ...] = ()
    legacy: Tuple[str, ...] = ()
    choices: Tuple[str, ...] = ()
    inherit: bool = True
    minimum: Optional[int] = None


KEYS: Tuple[Key, ...] = (
    # [vmim.local] only
    Key("uri", "vmemulator", "str", "local", "libvirt connection URI.",
        default="qemu:///system", legacy=("virthost",)),
    Key("mount_prefix", "mount", "path", "local",
        "Directory under which each slot is mounted as <mount>/<HostName> "
        "when the slot sets no `mount` of its own.", default="/mnt/vm/"),
    Key("lockdir", "lockdir", "path", "local",
        "Directory holding the per-slot lock files. It and every directory above it must be "
        "owned by root and writable by no other user (a parent such as /run/lock may be "
        "sticky): else every box action is refused (exit 7). Up to 1.0 the default was "
        "/run/lock/vmimagemanager, where any user could create it first.",
        default="/run/vmimagemanager/locks"),
    Key("statedir", "statedir", "path", "local",
        "Directory of what must survive a reboot: the mark of a slot whose restore did not "
        "finish (such a slot is not started until an image is restored into it), the re-make "
        "of a slot's filesystem that a killed run began, the record of the staging "
        "directories a run makes in a guest, the fleet worker's journal. Like "
        "lockdir it must be owned by root and writable by no other user (exit 7 otherwise).",
        default="/var/lib/vmimagemanager"),
    Key("broker", "broker", "str", "local",
        "AMQP URL of the fleet's RabbitMQ broker (`amqp://user:password@host:5672/vhost`, "
        "`amqps://` for TLS). The worker serves it; a command with box actions or lists sends "
        "them there instead of running them here (`--local` runs here). See docs/fleet.md."),
    Key("broker_ca", "broker_ca", "path", "local",
        "CA certificate file that the broker's TLS certificate must chain to (amqps)."),
    Key("broker_cert", "broker_cert", "path", "local",
        "Client certificate file presented to the broker (amqps), with broker_key."),
    Key("broker_key", "broker_key", "path", "local",
        "Private key file of broker_cert (amqps)."),
    Key("vmlist", "vmlist", "list", "local",
        "Accepted for compatibility with 0.3 configs and ignored: every [vmim.vm.*] "
        "section is a slot.", default=()),
    # slot keys ([vmim.local] values are their defaults where `inherit`)
    Key("name", "HostName", "str", "slot",
        "The slot's name: the libvirt domain name, and the BOX of `-b`. Required "
        "(legacy format: defaults to the section name).", inherit=False),
    Key("enabled", "vm_slot_enabled", "bool", "slot",
        "Whether the section is a slot. Current format: default yes. Legacy format: "
        "a section is a slot only when this is yes/y/on/1.", default=True, inherit=False),
    Key("store_type", "store_type", "choice", "slot",
        "Disk strategy. Derived when absent: `qcow2` when HostDisk ends in .qcow2, `kpartx` "
        "(a disk with a partition table, whatever maps it: `mapper`) when HostDisk and "
        "partition are set, `lvm` when LvmVolumeGroup is set, else "
        "`partition` when HostDisk or root is set.",
        choices=STORE_TYPES),
    Key("hostdisk", "HostDisk", "path", "slot",
        "Disk image file or block device given to the domain; with `partition`, it "
        "carries an MBR or GPT partition table.", inherit=False),
    Key("partition", "partition", "int", "slot",
        "1-based number of the partition of HostDisk holding the root filesystem.",
        minimum=1),
    Key("root", "root", "path", "slot",
        "Device or file holding the root filesystem directly (no partition table).",
        inherit=False),
    Key("swap", "swap", "path", "slot", "Swap device given to the domain (never touched).",
        inherit=False),
    Key("standby", "standby", "path", "slot",
        "A second disk of the slot, of the same form as HostDisk or root (a file or a block "
        "device; `partition` applies to both): `--stage` restores the next image into it while "
        "the domain runs, and the next `-u` swaps it in (the domain's disk becomes the standby). "
        "A qcow2 slot needs none: its standby is the overlay beside HostDisk "
        "(NAME.standby.qcow2). See docs/guide.md, \"Re-image with one reboot\".",
        inherit=False),
    Key("disksize", "disksize", "size", "slot",
        "Size of the slot's disk when vmimagemanager makes it: a HostDisk or root *file* "
        "that does not exist yet is created by the first action that needs it (sparse; "
        "with `partition = 1`, an MBR table with that one partition; the filesystem of the "
        "image being restored, else ext4). Bytes, or a size such as \"20G\" (K, M, G, T: "
        "powers of 1024). Block devices are never created.", minimum=16 << 20),
    Key("lvm_volume_group", "LvmVolumeGroup", "str", "slot",
        "LVM volume group of the slot's logical volume (store_type lvm)."),
    Key("lvm_volume", "LvmVolume", "str", "slot",
        "Name of the slot's logical volume in LvmVolumeGroup (default: HostName).",
        inherit=False),
    Key("mapper", "mapper", "choice", "slot",
        "How a partition of HostDisk is mapped: `loop` (a loop device at the partition's "
        "offset, works everywhere) or `kpartx` (device-mapper).",
        default="loop", choices=("loop", "kpartx")),
    Key("mount", "mount", "path", "slot",
        "Host directory where the slot's root filesystem is mounted "
        "(default: [vmim.local] mount + HostName).", inherit=False),
    Key("vmimages", "vmimages", "path", "slot", "Image store directory.",
        aliases=("images",)),
    Key("vminserts", "vminserts", "path", "slot",
        "Inserts store: where `-i` reads archives (default: vmextracts).",
        aliases=("inserts", "overlay")),
    Key("vmextracts", "vmextracts", "path", "slot",
        "Where `-e` writes extracts (default: vminserts).",),
    Key("mac", "mac", "list", "slot", "MAC address(es) of the domain's network interfaces "
        "(one interface each, on `bridge`).", default=(), inherit=False),
    Key("bridge", "bridge", "str", "slot", "Host bridge of the domain's network interfaces; "
        "set alone, one interface with a MAC libvirt chooses. With `mac` and no `bridge`: "
        "`br0`. Neither set: the domain has no network interface."),
    Key("memory", "memory", "int", "slot", "Memory of a domain defined by `-u`, in KiB.",
        default=2097152, legacy=("vAlocatedMemory",), minimum=1),
    Key("vcpu", "vcpu", "int", "slot", "vCPUs of a domain defined by `-u`.", default=1,
        minimum=1),
    Key("kernel", "kernel", "path", "slot", "Kernel for direct kernel boot."),
    Key("initrd", "initrd", "path", "slot", "Initrd for direct kernel boot."),
    Key("cmdline", "cmdline", "str", "slot", "Kernel command line for direct kernel boot."),
    Key("virt_type", "virt_type", "choice", "slot",
        "libvirt domain type of a domain defined by `-u`: `kvm` (hardware virtualisation) or "
        "`qemu` (software emulation, for hosts without usable KVM).",
        default="kvm", choices=("kvm", "qemu")),
    Key("serial_log", "serial_log", "path", "slot",
        "File that receives the serial console of a domain defined by `-u` "
        "(default: a pty, not logged).", inherit=False),
    Key("hosttransform", "hosttransform", "path", "slot",
        "XSLT stylesheet that turns the generated domain description into libvirt domain "
        "XML (default: the shipped libvirt.xsl)."),
    Key("timeout", "timeout", "int", "slot",
        "Seconds to wait for a graceful shutdown before forcing the domain off.",
        default=180, minimum=0),
    Key("clear", "clear", "choice", "slot",
        "How an archive restore empties the filesystem first: `auto` deletes the old content "
        "while the image unpacks when it has at most 32768 inodes and the filesystem has room "
        "for both (bytes and inodes: the image's, when known, else as many as the old "
        "content's), else re-makes it when "
        "vmimagemanager can make the same filesystem again (ext2/3/4 and xfs: the same UUID, "
        "label, features, geometry and superblock defaults, read from it and tried on a file "
        "first), else deletes its content first; `delete` always deletes the content; "
        "`mkfs` always re-makes it (the same filesystem where it can, else the type's "
        "defaults with the same type, UUID and label). A restore's `--json` says which ran "
        "and why.",
        default="auto", choices=("auto", "delete", "mkfs")),
    Key("disk_image_format", "disk_image_format", "choice", "slot",
        "Format of images stored with --disk-image: `qcow2`, or `raw` (a raw image restores onto "
        "a slot on the same reflink-capable filesystem as a reflink copy: constant time).",
        default="qcow2", choices=tuple(DiskFormat)),
    Key("qcow2_compress", "qcow2_compress", "bool", "slot",
        "Compress qcow2 images written by a store (smaller, slower to write).", default=False),
    Key("sourceimage", "sourceimage", "bool", "slot",
        "Write /sourceimage holding the image name into the guest after a restore.",
        default=False),
)

#: Keys real configs carry that no longer mean anything: one warning each, then ignored.
OBSOLETE_KEYS = {
    "ip": "only used by Xen templates",
    "host": "not used",
    "vmcfg": "Xen configuration, not used",
    "vmlock": "locks live in [vmim.local] lockdir",
    "xenconftemplate": "Xen is not supported",
    "conftemplatexen": "Xen is not supported",
    "vmconfdir": "Xen configuration, not used",
    "formatfilter": "use clear = \"mkfs\"",
    "currentmemory": "the domain gets `memory`",
    "calocatedmemory": "the domain gets `memory`",
    "disk": "use HostDisk or root",
    "devicemodel": "not used",
    "partisonsize": "not used",
    "snapshot": "not used",
}

#: scope ("local", "slot") -> lower-case name or alias as written in a section -> its key
BY_SCOPE: Dict[str, Dict[str, Key]] = {"local": {}, "slot": {}}
for _k in KEYS:
    for _n in (_k.ini, *_k.aliases):
        BY_SCOPE[_k.scope][_n.lower()] = _k
#: lower-case 0.2 name -> its key (the legacy format's other spellings)
LEGACY_NAMES: Dict[str, Key] = {n.lower(): k for k in KEYS for n in k.legacy}


def default(attr: str) -> Any:
    """The default of the key whose attribute is attr: the one place defaults are written."""
    return next(k.default for k in KEYS if k.attr == attr)
