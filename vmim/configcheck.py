"""Checking the slots of a configuration: one slot assembled from its section and the
defaults (its store type derived, the keys its store type needs present, paths normalised),
and slots that would step on each other (one name, disk or mount point) marked in conflict."""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

from vmim.configread import Collector, key_of
from vmim.configtypes import Slot
from vmim.keys import KEYS
from vmim.paths import is_under


def build_slot(section: str, fmt: str, vals: Dict[str, Any], slot_defaults: Mapping[str, Any],
               local_vals: Mapping[str, Any], col: Collector) -> Optional[Slot]:
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
                col.error(section, key_of(attr).ini, "is required with store_type \"kpartx\"")
    elif st == "partition" and not (merged.get("hostdisk") or merged.get("root")):
        col.error(section, "root", "store_type \"partition\" needs root (or HostDisk)")
    elif st == "partition" and merged.get("partition") is not None and not merged.get("root"):
        col.error(section, "partition", f"is {merged['partition']}, but store_type "
                  "\"partition\" mounts HostDisk itself as the filesystem (no partition "
                  "table): for partition N of HostDisk, store_type is \"kpartx\" (derived "
                  "when store_type is absent)")
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
        prefix = local_vals.get("mount_prefix", key_of("mount_prefix").default)
        merged["mount"] = os.path.join(prefix, name)
    merged["mount"] = os.path.normpath(merged["mount"])
    for attr in ("vmimages", "vminserts", "vmextracts"):
        if merged.get(attr):
            merged[attr] = os.path.normpath(merged[attr])

    names = {f.name for f in fields(Slot)}
    return Slot(section=section, **{k: v for k, v in merged.items() if k in names})


def check_slots(slots: Sequence[Slot], col: Collector) -> List[Slot]:
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
                if first.name != s.name and (is_under(own, mount) or is_under(mount, own)):
                    how = ("is also" if own == mount else
                           "lies inside" if is_under(own, mount) else "contains")
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
