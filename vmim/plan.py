"""What one command asks of each box, and the fixed order the steps run in (design §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

#: The fixed per-box pipeline, whatever the order of the flags.
PIPELINE = ("kill", "down", "mount", "extract", "store", "restore", "insert", "release", "up")
#: Steps that mount or map the slot's disk: they need root.
DISK_ACTIONS = ("mount", "extract", "store", "restore", "insert", "release")
#: Steps that change or read the slot's filesystem: they stop the domain and mount it first.
DATA_ACTIONS = ("extract", "store", "restore", "insert")
BOX_PLACEHOLDER = "{box}"


@dataclass(frozen=True)
class Transfer:
    """An insert or extract: an archive NAME and a directory inside the guest."""

    name: str
    directory: str


@dataclass
class Request:
    """What the command line asks for, validated."""

    boxes: List[str] = field(default_factory=list)
    actions: List[str] = field(default_factory=list)  # in PIPELINE order
    lists: List[str] = field(default_factory=list)
    store: Optional[str] = None
    restore: Optional[str] = None
    inserts: List[Transfer] = field(default_factory=list)
    extracts: List[Transfer] = field(default_factory=list)
    format: Optional[str] = None
    disk_image: bool = False  # --disk-image: store/restore the whole disk

    def store_name(self, box: str) -> Optional[str]:
        return self.store.replace(BOX_PLACEHOLDER, box) if self.store is not None else None

    def extract_name(self, name: str, box: str) -> str:
        return name.replace(BOX_PLACEHOLDER, box)


# --------------------------------------------------------------------------- dry run


@dataclass(frozen=True)
class Observed:
    """What a dry run looked at, without changing anything."""

    domain_state: str  # a libvirt state word, or "undefined"
    in_config: bool
    disk: str  # the slot's disk as configured, or "-"
    mount: Optional[str]
    mounted: bool
    store_type: Optional[str]
    images: Dict[str, str] = field(default_factory=dict)  # name → detected format or "missing"
    inserts: Dict[str, str] = field(default_factory=dict)  # the same, in the inserts store


@dataclass(frozen=True)
class PlannedStep:
    step: str
    description: str

    def as_dict(self) -> dict:
        return {"step": self.step, "description": self.description}


def plan_box(req: Request, box: str, seen: Observed, *, timeout: int, clear: str,
             fmt: str) -> List[PlannedStep]:
    """The steps one box would go through, described; pure (no I/O)."""
    steps: List[PlannedStep] = []
    running = seen.domain_state not in ("shut off", "undefined")
    add = lambda step, text: steps.append(PlannedStep(step, text))  # noqa: E731
    needs_disk = any(a in req.actions for a in DATA_ACTIONS)
    for action in req.actions:
        if action == "kill":
            add("kill", "force the domain off (libvirt destroy)" if running else
                f"nothing: the domain is {seen.domain_state}")
        elif action == "down":
            add("down", f"ACPI shutdown, forced off after {timeout} s" if running else
                f"nothing: the domain is {seen.domain_state}")
        elif action == "mount":
            add("mount", _mount_text(seen, running and "down" not in req.actions))
        elif action in DATA_ACTIONS:
            if needs_disk and action == _first(req.actions, DATA_ACTIONS):
                if running and "down" not in req.actions and "kill" not in req.actions:
                    add("down", f"ACPI shutdown first, forced off after {timeout} s")
                if "mount" not in req.actions and not seen.mounted and not _whole_disk(req, seen):
                    add("mount", _mount_text(seen, False))
            if action == "extract":
                for t in req.extracts:
                    add("extract", f"archive guest {t.directory} as "
                        f"{req.extract_name(t.name, box)} ({fmt}) into the extracts store")
            elif action == "store" and _whole_disk(req, seen, "store"):
                add("store", f"write the whole disk as image {req.store_name(box)} under a "
                    "temporary name, sync, rename into place")
            elif action == "store":
                add("store", f"write the filesystem as image {req.store_name(box)} ({fmt}) "
                    "under a temporary name, sync, rename into place")
            elif action == "restore":
                name = req.restore or ""
                found = seen.images.get(name, "missing")
                if found == "missing":
                    add("restore", f"image {name} not found: the run would fail (exit 4)")
                elif seen.store_type == "qcow2" and found in DISK_IMAGE_FORMATS:
                    add("restore", f"check image {name} ({found}), replace the slot's disk with a "
                        "new qcow2 overlay on it")
                elif req.disk_image:
                    add("restore", f"check image {name} ({found}), write it over the whole disk "
                        "(a reflink where possible) and rename it into place")
                elif found == "rsync":
                    add("restore", f"check image {name}, then mirror it (rsync --delete)")
                else:
                    how = "re-make the filesystem (same UUID and label)" if clear == "mkfs" \
                        else "delete the filesystem's content"
                    add("restore", f"check image {name} ({found}), {how}, unpack it into a "
                        "staging directory and move it into the guest")
            elif action == "insert":
                for t in req.inserts:
                    found = seen.inserts.get(t.name, "missing")
                    add("insert", f"unpack insert {t.name} ({found}) at {t.directory}"
                        if found != "missing" else f"insert {t.name} not found: the run would "
                        "fail (exit 4)")
        elif action == "release":
            add("release", "unmount, detach the loop device(s)" if seen.mounted or needs_disk
                or "mount" in req.actions else "nothing mounted or mapped now")
        elif action == "up":
            text = "release the disk, " if seen.in_config and seen.store_type else ""
            text += ("define the domain from the config through libvirt.xsl, start it"
                     if seen.domain_state == "undefined" else
                     "nothing: already running" if running else "start the domain")
            add("up", text)
    return steps


#: Image formats that are whole disks (a qcow2 slot restores them as a new overlay).
DISK_IMAGE_FORMATS = ("qcow2", "raw")


def _whole_disk(req: Request, seen: Observed, only: str = "") -> bool:
    """Whether the data steps (or only the one named) work on the whole disk, no mount needed:
    --disk-image; on a qcow2 slot a store without a format flag and a restore of a disk image."""
    if req.disk_image:
        return True
    if seen.store_type != "qcow2":
        return False
    steps = [only] if only else [a for a in req.actions if a in DATA_ACTIONS]
    return all((a == "store" and req.format is None) or
               (a == "restore" and seen.images.get(req.restore or "") in DISK_IMAGE_FORMATS)
               for a in steps)


def _first(actions: List[str], among: Tuple[str, ...]) -> str:
    return next(a for a in actions if a in among)


def _mount_text(seen: Observed, refused: bool) -> str:
    if refused:
        return f"refused: the domain is {seen.domain_state} (add -d)"
    if seen.mounted:
        return f"nothing: already mounted at {seen.mount}"
    via = {"kpartx": "a loop device at the partition's offset",
           "partition": "a loop device (or the block device itself)",
           "lvm": "the logical volume",
           "qcow2": "a qemu-storage-daemon FUSE export and a loop device"}.get(seen.store_type or "", "?")
    return f"map {seen.disk} through {via}, mount it at {seen.mount}"
