"""Configuration: INI file → frozen dataclasses, current (0.3) and legacy (0.2) formats.

One table of keys (`KEYS`) drives parsing, defaults, `--print-config`, the template and
the config reference in docs/. Every problem is collected and reported at once, each with
file, section and key (exit 3).
"""

from __future__ import annotations

import configparser
import json
import logging
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from vmim.errors import ConfigError
from vmim.keys import (  # the key table
    _BY_SCOPE,
    _LEGACY_NAMES,
    FALSE_WORDS,
    KEYS,
    OBSOLETE_KEYS,
    TRUE_WORDS,
    Key,
    default,
)

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/vmimagemanager/vmimagemanager.cfg"
ENV_CONFIG = "VMIM_CFG"

LOCAL_SECTION = "vmim.local"
SLOT_PREFIX = "vmim.vm."
LEGACY_SECTION = "VmImageManager"


#: the standby disk of a slot is mounted at its mount point with this suffix
STANDBY_MOUNT_SUFFIX = ".standby"


@dataclass(frozen=True)
class Slot:
    """One slot: a libvirt domain and the disk holding its root filesystem."""

    name: str
    section: str
    store_type: Optional[str]
    mount: str
    hostdisk: Optional[str] = None
    partition: Optional[int] = None
    root: Optional[str] = None
    swap: Optional[str] = None
    lvm_volume_group: Optional[str] = None
    lvm_volume: Optional[str] = None
    mapper: str = default("mapper")
    vmimages: Optional[str] = None
    vminserts: Optional[str] = None
    vmextracts: Optional[str] = None
    mac: Tuple[str, ...] = ()
    bridge: Optional[str] = None
    memory: int = default("memory")
    vcpu: int = default("vcpu")
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    virt_type: str = default("virt_type")
    serial_log: Optional[str] = None
    hosttransform: Optional[str] = None
    timeout: int = default("timeout")
    clear: str = default("clear")
    disk_image_format: str = default("disk_image_format")
    qcow2_compress: bool = default("qcow2_compress")
    sourceimage: bool = default("sourceimage")
    enabled: bool = default("enabled")
    disksize: Optional[int] = None
    standby: Optional[str] = None  # the second disk --stage restores into (vmim.standby)
    #: a problem of the config that concerns this slot only (its mount point is another
    #: slot's): warned at load; any action on the slot's disk is refused with it (exit 3)
    conflict: Optional[str] = None

    @property
    def disk(self) -> Optional[str]:
        """The file or device holding the slot's disk, as configured."""
        if self.store_type == "lvm" and not self.root and not self.hostdisk:
            return f"/dev/{self.lvm_volume_group}/{self.lvm_volume or self.name}"
        return self.hostdisk or self.root

    @property
    def standby_disk(self) -> Optional[str]:
        """The slot's second disk, that --stage restores into (vmim.standby): the `standby`
        key, else for a qcow2 slot the overlay NAME.standby.qcow2 beside HostDisk."""
        if self.standby:
            return self.standby
        if "/" in self.name:  # BOX/standby, the standby of a slot as a slot: none of its own
            return None
        if self.store_type == "qcow2" and self.hostdisk:
            stem = self.hostdisk[:-len(".qcow2")] if self.hostdisk.endswith(".qcow2") \
                else self.hostdisk
            return f"{stem}.standby.qcow2"
        return None

    @property
    def standby_mount(self) -> str:
        """Where the standby disk's filesystem is mounted while an image is staged into it."""
        return self.mount + STANDBY_MOUNT_SUFFIX

    def describe_disk(self) -> str:
        disk = self.disk
        if disk is None:
            return "-"
        if self.partition is not None and self.store_type in ("kpartx", "lvm"):
            return f"{disk} (partition {self.partition})"
        return disk


@dataclass(frozen=True)
class Config:
    path: str
    format: str  # "current" or "legacy"
    uri: str = default("uri")
    mount_prefix: str = default("mount_prefix")
    lockdir: str = default("lockdir")
    statedir: str = default("statedir")
    broker: Optional[str] = default("broker")
    broker_ca: Optional[str] = default("broker_ca")
    broker_cert: Optional[str] = default("broker_cert")
    broker_key: Optional[str] = default("broker_key")
    vmlist: Tuple[str, ...] = ()
    slots: Tuple[Slot, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    warnings: Tuple[str, ...] = ()

    def slot(self, name: str) -> Optional[Slot]:
        for s in self.slots:
            if s.name == name:
                return s
        return None

    @property
    def slot_names(self) -> List[str]:
        return [s.name for s in self.slots]

    def image_dirs(self) -> List[str]:
        return _unique([self.defaults.get("vmimages")] + [s.vmimages for s in self.slots])

    def insert_dirs(self) -> List[str]:
        dirs: List[Optional[str]] = [self.defaults.get("vminserts"), self.defaults.get("vmextracts")]
        for s in self.slots:
            dirs += [s.vminserts, s.vmextracts]
        return _unique(dirs)


def _unique(items: Iterable[Optional[str]]) -> List[str]:
    out: List[str] = []
    for i in items:
        if i and os.path.normpath(i) not in out:
            out.append(os.path.normpath(i))
    return out


# --------------------------------------------------------------------------- lookup


def find_config_path(cli_path: Optional[str], environ: Mapping[str, str] = os.environ) -> str:
    """--config, else $VMIM_CFG, else the default path; exit 3 if the file is missing."""
    if cli_path:
        path, origin = cli_path, "--config"
    elif environ.get(ENV_CONFIG):
        path, origin = environ[ENV_CONFIG], f"${ENV_CONFIG}"
    else:
        path, origin = DEFAULT_CONFIG_PATH, "the default path"
    if os.path.isdir(path):
        raise ConfigError(f"configuration file '{path}' (from {origin}) is a directory; "
                          "give the file in it")
    if not os.path.isfile(path):
        template = template_path()
        copy = (f"copy the template {template} there and edit it, or " if template else
                f"{TEMPLATE_NAME} shows every key; ")
        raise ConfigError(
            f"configuration file '{path}' (from {origin}) was not found; "
            f"{copy}give one with --config or ${ENV_CONFIG}"
        )
    return path


TEMPLATE_NAME = "vmimagemanager.cfg.template"


def template_path() -> str:
    """The configuration template as installed (package or pip prefix), else the source tree's."""
    import sys

    for candidate in (os.path.join(sys.prefix, "share", "vmimagemanager", TEMPLATE_NAME),
                      os.path.join("/usr/share/vmimagemanager", TEMPLATE_NAME),
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   TEMPLATE_NAME)):
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    return ""


def load(cli_path: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> Config:
    path = find_config_path(cli_path, environ)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)


# --------------------------------------------------------------------------- parsing


class _Collector:
    def __init__(self, path: str):
        self.path = path
        self.errors: List[str] = []
        self.warnings: List[str] = []

    def where(self, section: str, key: Optional[str] = None) -> str:
        return f"{self.path}: [{section}]" + (f" {key}" if key else "")

    def error(self, section: str, key: Optional[str], msg: str) -> None:
        self.errors.append(f"{self.where(section, key)}: {msg}")

    def warn(self, section: str, key: Optional[str], msg: str) -> None:
        self.warnings.append(f"{self.where(section, key)}: {msg}")


def parse(text: str, path: str = "<config>") -> Config:
    """Parse configuration text; raise ConfigError listing every problem."""
    cp = configparser.ConfigParser(strict=False, interpolation=configparser.BasicInterpolation())
    cp.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        cp.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: malformed INI: {_one_line(str(exc))}") from None

    col = _Collector(path)
    twice = _check_duplicates(text, cp, col)
    sections = cp.sections()
    current = [s for s in sections if s == LOCAL_SECTION or s.startswith(SLOT_PREFIX)]
    legacy = LEGACY_SECTION in sections
    if current:
        fmt = "current"
        if legacy:
            col.warn(LEGACY_SECTION, None, "legacy section ignored: the file also has "
                     f"[{LOCAL_SECTION}]/[{SLOT_PREFIX}*] sections")
    elif legacy:
        fmt = "legacy"
    else:
        raise ConfigError(
            f"{path}: no [{LOCAL_SECTION}] or [{SLOT_PREFIX}NAME] sections "
            f"(nor a legacy [{LEGACY_SECTION}] section): not a vmimagemanager configuration"
        )

    global_section = LOCAL_SECTION if fmt == "current" else LEGACY_SECTION
    local_raw = _read_section(cp, global_section, col) if cp.has_section(global_section) else {}
    local_vals = _convert_section(local_raw, global_section, fmt, col, is_local=True)

    slot_sections: List[str] = []
    for s in sections:
        if s == global_section:
            continue
        if fmt == "current":
            if s.startswith(SLOT_PREFIX):
                slot_sections.append(s)
            elif s != LEGACY_SECTION:
                col.warn(s, None, "section is not used (not [vmim.local] or [vmim.vm.NAME])")
        else:
            slot_sections.append(s)

    slot_defaults = {k: v for k, v in local_vals.items() if _key(k).scope == "slot"}
    slots: List[Slot] = []
    used = {global_section}
    for s in slot_sections:
        raw = _read_section(cp, s, col)
        if not _enabled(raw, fmt):
            log.debug("%s: [%s] is not an enabled slot", path, s)
            continue
        used.add(s)
        vals = _convert_section(raw, s, fmt, col, is_local=False)
        slot = _build_slot(s, fmt, vals, slot_defaults, local_vals, col)
        if slot is not None:
            slots.append(slot)

    for section, key, msg in twice:  # in a section that is not used (0.2's [AvailalableHosts]
        # lists hosts, some twice): nothing depends on which value wins
        if section in used:
            col.error(section, key, msg)
        else:
            col.warn(section, key, f"{msg.split(';')[0]} in a section that is not used")
    slots = _check_slots(slots, col)
    if col.errors:
        raise ConfigError(col.errors)
    for w in col.warnings:
        log.warning("%s", w)

    return Config(
        path=path,
        format=fmt,
        uri=local_vals.get("uri", default("uri")),
        mount_prefix=local_vals.get("mount_prefix", default("mount_prefix")),
        lockdir=local_vals.get("lockdir", default("lockdir")),
        statedir=local_vals.get("statedir", default("statedir")),
        broker=local_vals.get("broker"),
        broker_ca=local_vals.get("broker_ca"),
        broker_cert=local_vals.get("broker_cert"),
        broker_key=local_vals.get("broker_key"),
        vmlist=tuple(local_vals.get("vmlist", ())),
        slots=tuple(slots),
        defaults=_defaults_view(slot_defaults),
        warnings=tuple(col.warnings),
    )


def _check_duplicates(text: str, cp: configparser.ConfigParser,
                      col: _Collector) -> List[Tuple[str, str, str]]:
    """A section written twice (configparser would merge them silently): an error naming both
    lines. A key written twice in a section: returned as (section, key, message), an error
    where the section is used."""
    twice: List[Tuple[str, str, str]] = []
    sections: Dict[str, int] = {}
    keys: Dict[str, int] = {}
    section: Optional[str] = None
    in_value = False
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0].isspace() and in_value:
            continue  # a continuation line of a value
        m = cp.SECTCRE.match(stripped)
        if m:
            section, keys, in_value = m.group("header"), {}, False
            if section in sections:
                col.error(section, None, f"section written twice (lines {sections[section]} "
                          f"and {lineno}); merge them into one")
            sections.setdefault(section, lineno)
            continue
        m = cp.OPTCRE.match(stripped)  # the default delimiters, as parse() uses
        if m is None or section is None:
            continue  # configparser has reported it
        in_value = True
        key = cp.optionxform(m.group("option").rstrip())
        if key in keys:
            twice.append((section, key, f"written twice in this section (lines {keys[key]} and "
                          f"{lineno}); keep one"))
        keys.setdefault(key, lineno)
    return twice


def _enabled(raw: Mapping[str, str], fmt: str) -> bool:
    """Whether a section is a slot: current format unless disabled, legacy only when enabled."""
    text = raw.get("vm_slot_enabled")
    if text is None:
        return fmt == "current"
    ok, value = _convert_value(_key("enabled"), text, fmt)
    return bool(value) if ok else True  # an invalid value is reported as an error later


def _defaults_view(slot_defaults: Mapping[str, Any]) -> Mapping[str, Any]:
    """Slot defaults from [vmim.local], with vminserts and vmextracts standing in for each other."""
    d = dict(slot_defaults)
    d.setdefault("vminserts", d.get("vmextracts"))
    d.setdefault("vmextracts", d.get("vminserts"))
    return d


def _key(attr: str) -> Key:
    for k in KEYS:
        if k.attr == attr:
            return k
    raise KeyError(attr)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_section(cp: configparser.ConfigParser, section: str, col: _Collector) -> Dict[str, str]:
    """Raw strings of the keys written in this section (DEFAULT keys included)."""
    out: Dict[str, str] = {}
    for name in cp.options(section):
        try:
            out[name] = cp.get(section, name)
        except (configparser.InterpolationError, ValueError) as exc:
            col.error(section, name, f"bad %-interpolation ({_one_line(str(exc))}); write a literal % as %%")
    return out


def _convert_section(raw: Mapping[str, str], section: str, fmt: str, col: _Collector,
                     *, is_local: bool) -> Dict[str, Any]:
    """Map written keys to key-table attributes with typed values; warn about unknown ones."""
    vals: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    for name, text in raw.items():
        key = _lookup(name, fmt, is_local)
        if key is None:
            if name in OBSOLETE_KEYS:
                col.warn(section, name, f"obsolete key ignored ({OBSOLETE_KEYS[name]})")
            elif is_local and name in _BY_SCOPE["slot"] and not _BY_SCOPE["slot"][name].inherit:
                col.warn(section, name, "is a per-slot key and has no default here; ignored")
            else:
                col.warn(section, name, "unknown key ignored" + _did_you_mean(name, is_local))
            continue
        if key.attr in seen:
            col.warn(section, name, f"also given as '{seen[key.attr]}'; this one wins")
        seen[key.attr] = name
        ok, value = _convert_value(key, text, fmt)
        if not ok:
            col.error(section, name, value)
            continue
        if value is None:
            continue
        vals[key.attr] = value
    return vals


def _did_you_mean(name: str, is_local: bool) -> str:
    """'; did you mean HostDisk?' for a misspelt key (the key table's spelling), else ''."""
    import difflib

    spelling: Dict[str, str] = {}
    for k in KEYS:
        if k.scope == "slot" or is_local:
            for n in (k.ini, *k.aliases):
                spelling.setdefault(n.lower(), n)
    close = difflib.get_close_matches(name.lower(), list(spelling), n=1, cutoff=0.75)
    return f"; did you mean {spelling[close[0]]}?" if close else ""


def _lookup(name: str, fmt: str, is_local: bool) -> Optional[Key]:
    scopes = ("local", "slot") if is_local else ("slot",)
    for scope in scopes:
        key = _BY_SCOPE[scope].get(name)
        if key is not None and (scope == "local" or not is_local or key.inherit):
            return key
    key = _LEGACY_NAMES.get(name)
    if key is not None and (is_local or key.scope == "slot"):
        return key
    return None


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> Optional[int]:
    """Bytes from 1073741824, "1G", "1 GiB", "512M", "1.5T" (powers of 1024), rounded up to
    whole MiB, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        return None
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        return None
    return -(-size // (1 << 20)) << 20  # whole MiB: partition tables and loop devices want it


def _convert_value(key: Key, text: str, fmt: str) -> Tuple[bool, Any]:
    """Return (True, value) — value None meaning 'not set' — or (False, error message)."""
    text = text.strip()
    if fmt == "current":
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text  # a bare value is taken as a string
    else:
        value = text
        if len(text) >= 2 and text[0] == text[-1] == '"':
            value = text[1:-1]
    if value is None or value == "" or value == []:
        return True, None

    t = key.type
    if t in ("str", "path", "choice"):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            return False, f"expected a string, got {json.dumps(value)}"
        if not isinstance(value, str):
            value = text  # a bare number is text for a string key
        if t == "path" and not os.path.isabs(value):
            return False, f"expected an absolute path, got {json.dumps(value)}"
        if t == "choice":
            if value.lower() not in key.choices:
                return False, f"expected one of {', '.join(key.choices)}, got {json.dumps(value)}"
            value = value.lower()
        return True, value
    if t == "int":
        if isinstance(value, str) and fmt == "legacy":
            try:
                value = int(value)
            except ValueError:
                return False, f"expected an integer, got {json.dumps(value)}"
        if isinstance(value, bool) or not isinstance(value, int):
            return False, f"expected an integer, got {json.dumps(value)}"
        if key.minimum is not None and value < key.minimum:
            return False, f"must be at least {key.minimum}, got {value}"
        return True, value
    if t == "size":
        size = parse_size(value)
        if size is None:
            return False, f"expected a size such as \"20G\" or a number of bytes, got {json.dumps(value)}"
        if key.minimum is not None and size < key.minimum:
            return False, f"must be at least {key.minimum >> 20} MiB, got {json.dumps(value)}"
        return True, size
    if t == "bool":
        if isinstance(value, bool):
            return True, value
        word = str(value).lower()
        if word in TRUE_WORDS:
            return True, True
        if word in FALSE_WORDS:
            return True, False
        return False, f"expected a boolean (true/false, yes/no, on/off, 1/0), got {json.dumps(value)}"
    if t == "list":
        if isinstance(value, str):
            items = value.replace(",", " ").split() if fmt == "legacy" else [value]
            return True, tuple(items)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, f"expected a list of strings, got {json.dumps(value)}"
    raise AssertionError(f"unknown key type {t}")


def _build_slot(section: str, fmt: str, vals: Dict[str, Any], slot_defaults: Mapping[str, Any],
                local_vals: Mapping[str, Any], col: _Collector) -> Optional[Slot]:
    merged: Dict[str, Any] = {k.attr: k.default for k in KEYS if k.scope == "slot"}
    merged.update(slot_defaults)
    merged.update(vals)
    # One inserts store serves -i and -e unless both are set apart.
    ins, ext = "vminserts", "vmextracts"
    merged[ins] = vals.get(ins) or slot_defaults.get(ins) or vals.get(ext) or slot_defaults.get(ext)
    merged[ext] = vals.get(ext) or slot_defaults.get(ext) or vals.get(ins) or slot_defaults.get(ins)

    name = merged.get("name")
    if not name:
        if fmt == "legacy":
            name = section
        else:
            col.error(section, "HostName", "is required: the libvirt domain name of this slot")
            return None
    merged["name"] = name
    if "/" in name or name in (".", "..") or "\0" in name:
        col.error(section, "HostName", f"{json.dumps(name)} is not a domain name (no '/', "
                  "not '.' or '..'): it names the slot's lock and mount point")
        return None
    if name == "any-free":  # -b any-free claims a free slot: a slot of that name is unreachable
        col.error(section, "HostName", '"any-free" is the word -b uses to claim a free slot; '
                  "give the slot another name")
        return None

    st = merged.get("store_type")
    if st is None:
        if str(merged.get("hostdisk") or "").endswith(".qcow2"):
            st = "qcow2"
        elif merged.get("hostdisk") and merged.get("partition") is not None:
            st = "kpartx"
        elif merged.get("lvm_volume_group"):
            st = "lvm"
        elif merged.get("hostdisk") or merged.get("root"):
            st = "partition"
    merged["store_type"] = st
    if st == "kpartx":
        for attr in ("hostdisk", "partition"):
            if merged.get(attr) is None:
                col.error(section, _key(attr).ini, "is required with store_type \"kpartx\"")
    elif st == "partition" and not (merged.get("hostdisk") or merged.get("root")):
        col.error(section, "root", "store_type \"partition\" needs root (or HostDisk)")
    elif st == "lvm" and not (merged.get("lvm_volume_group") or merged.get("root")
                              or merged.get("hostdisk")):
        col.error(section, "LvmVolumeGroup", "store_type \"lvm\" needs LvmVolumeGroup (or root)")
    elif st == "qcow2" and not merged.get("hostdisk"):
        col.error(section, "HostDisk", "store_type \"qcow2\" needs HostDisk")

    standby = merged.get("standby")
    if standby:
        own = merged.get("hostdisk") or merged.get("root")
        if st == "lvm" and not own:
            col.error(section, "standby", "a slot on a logical volume named by LvmVolumeGroup "
                      "has no standby: name both disks with root and standby")
        elif own and os.path.normpath(standby) == os.path.normpath(own):
            col.error(section, "standby", f"'{standby}' is the slot's own disk: the standby "
                      "must be a second disk")
        merged["standby"] = os.path.normpath(standby)
    if not merged.get("mount"):
        prefix = local_vals.get("mount_prefix", _key("mount_prefix").default)
        merged["mount"] = os.path.join(prefix, name)
    merged["mount"] = os.path.normpath(merged["mount"])
    for attr in ("vmimages", "vminserts", "vmextracts"):
        if merged.get(attr):
            merged[attr] = os.path.normpath(merged[attr])

    names = {f.name for f in fields(Slot)}
    return Slot(section=section, **{k: v for k, v in merged.items() if k in names})


def _check_slots(slots: Sequence[Slot], col: _Collector) -> List[Slot]:
    """Two slots that would step on each other — one HostName in two sections, one disk, or
    overlapping mount points — are a warning at load, and each such slot carries the conflict
    and is refused when acted on (exit 3). Configs of 0.3 and 0.2 have them (0.3 merged two
    sections of one HostName silently): the other slots of such a config still work."""
    by_name: Dict[str, Slot] = {}
    by_disk: Dict[str, Slot] = {}
    by_mount: Dict[str, Slot] = {}
    conflicts: Dict[str, str] = {}
    kept: List[Slot] = []

    def conflict(s: Slot, key: str, first: Slot, what: str, remedy: str) -> None:
        col.warn(s.section, key, f"{what}; {'both are' if first.name != s.name else 'it is'} "
                 "refused until each has its own")
        for name in (s.name, first.name):
            conflicts.setdefault(name, f"{col.path}: [{s.section}] {key} {what}; {remedy}")

    for s in slots:
        other = by_name.get(s.name)
        if other is not None:  # one slot of that name: the first section's, refused
            conflict(s, "HostName", other, f"'{s.name}' is also the HostName of "
                     f"[{other.section}]", "give each slot its own, or remove one section")
            continue
        by_name[s.name] = s
        mine = [("mount", s.mount)] + ([("standby", s.standby_mount)] if s.standby_disk else [])
        for key, own in mine:
            for mount, first in by_mount.items():
                if first.name != s.name and (_under(own, mount) or _under(mount, own)):
                    how = ("is also" if own == mount else
                           "lies inside" if _under(own, mount) else "contains")
                    conflict(s, key, first, f"'{own}' {how} the mount point of slot "
                             f"'{first.name}' ([{first.section}])",
                             "releasing one would unmount the other: give each slot its own")
                    break
        for _key, own in mine:
            by_mount.setdefault(own, s)
        for key, disk in (("HostDisk" if s.hostdisk else "root", s.disk),
                          ("standby", s.standby_disk)):
            if not disk:
                continue
            norm = os.path.normpath(disk)
            other = by_disk.get(norm)
            if other is not None:
                conflict(s, key, other, f"disk '{disk}' is also a disk of slot "
                         f"'{other.name}' ([{other.section}])", "two slots cannot share a disk")
            by_disk.setdefault(norm, s)
        kept.append(s)
    return [replace(s, conflict=conflicts[s.name]) if s.name in conflicts else s for s in kept]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# --------------------------------------------------------------------------- output


def ini_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def render_config(cfg: Config) -> str:
    """The effective configuration in the current format (defaults filled in)."""
    lines = [f"# effective configuration read from {cfg.path} ({cfg.format} format)", "",
             f"[{LOCAL_SECTION}]"]
    local_attrs = {"uri": cfg.uri, "mount_prefix": cfg.mount_prefix, "lockdir": cfg.lockdir,
                   "statedir": cfg.statedir, "broker": cfg.broker, "broker_ca": cfg.broker_ca,
                   "broker_cert": cfg.broker_cert, "broker_key": cfg.broker_key,
                   "vmlist": cfg.vmlist}
    for k in KEYS:
        if k.scope == "local":
            if local_attrs[k.attr] is None:
                continue
            lines.append(f"{k.ini} = {ini_value(local_attrs[k.attr])}")
        elif k.inherit and cfg.defaults.get(k.attr) is not None:
            lines.append(f"{k.ini} = {ini_value(cfg.defaults[k.attr])}")
    for s in cfg.slots:
        section = s.section if s.section.startswith(SLOT_PREFIX) else SLOT_PREFIX + s.section
        lines += ["", f"[{section}]"]
        for k in KEYS:
            if k.scope != "slot" or k.attr == "enabled":
                continue
            value = getattr(s, k.attr)
            if value is None or value == ():
                continue
            lines.append(f"{k.ini} = {ini_value(value)}")
    return "\n".join(lines) + "\n"
