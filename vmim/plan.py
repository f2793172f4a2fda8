"""The plan: from the request, the config and the observed state, every step one box goes
through, in order, implicit ones included (design §3). Pure: no I/O.

`--dry-run` prints the plan; the runner (vmim.runner) executes exactly its steps and nothing
else. When the observed state already decides the outcome (an unknown image, a running domain
and no step that stops it, a locked slot...), the plan carries that verdict: the dry run exits
with its code, and the real run stops with it before any step touches the slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmim.errors import EXIT_CLEANUP, EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_LOCKED, EXIT_STATE
from vmim.request import (  # noqa: F401 — the request's vocabulary, as plan has always named it
    ANY_FREE,
    BOX_PLACEHOLDER,
    FORMATS,
    LISTS,
    PIPELINE,
    REQUEST_FIELDS,
    STAGE_ACTIONS,
    SWAP_ACTIONS,
    Request,
    Transfer,
)
from vmim.terminal import safe
from vmim.words import DiskFormat

#: Steps that mount or map the slot's disk: they need root.
DISK_ACTIONS = ("mount", "extract", "store", "restore", "insert", "release")
#: Steps that change or read the slot's filesystem: they stop the domain and mount it first.
DATA_ACTIONS = ("extract", "store", "restore", "insert")
#: the store keys of a slot and what each holds
STORE_KINDS = {"vmimages": "image", "vminserts": "insert", "vmextracts": "extract"}
#: What an image or insert the plan looked for is when it is not there.
MISSING = "missing"
#: How a restore clears the filesystem, by the slot's clear (the run says which ran and why)
CLEAR_PLANS = {
    "auto": "re-make the filesystem if the same one can be made again (type, UUID, label, "
            "features and geometry read from it, tried on a file first), else delete its "
            "content",
    "mkfs": "re-make the filesystem (the same one where it can, else same type, UUID and "
            "label)",
    "delete": "delete the filesystem's content",
}


@dataclass(frozen=True)
class Observed:
    """The state of one box that the plan depends on (vmim.observe reads it)."""

    domain_state: str  # a libvirt state word, or "undefined"
    in_config: bool
    disk: str = "-"  # the slot's disk as configured, or "-"
    mount: Optional[str] = None
    mounted: bool = False
    store_type: Optional[str] = None
    clear: str = "auto"
    timeout: int = 180
    images: Dict[str, str] = field(default_factory=dict)  # name → detected format, or MISSING
    #: the image to restore carries a digest this host checks, in metadata that still
    #: describes it (vmim.steps.proof.planned_format): the verify step proves it by that
    checksum: bool = False
    inserts: Dict[str, str] = field(default_factory=dict)  # the same, in the inserts store
    missing_stores: Tuple[str, ...] = ()  # store keys (vmimages...) the request needs, unset
    unusable: Tuple[str, ...] = ()  # why a requested image or insert is missing or unusable
    locked_by: Optional[str] = None  # "pid N (command)" when another command holds the slot
    incomplete: Optional[str] = None  # the image of a restore that did not finish
    pinned: Optional[str] = None  # who holds the slot's disk mounted in another namespace
    held_by: Optional[str] = None  # why the slot's disk is in use: a process holds QEMU's lock
    root: bool = True  # whether the run is root (mounting and loop devices need it)
    conflict: Optional[str] = None  # the config's problem with this slot (a shared mount point)
    create: Optional[str] = None  # the slot's disk is missing and will be made: how (disksize)
    standby: Optional[str] = None  # the slot's standby disk (vmim.standby), if it has one
    staged: Optional[str] = None  # the image staged on the standby, ready to be swapped in
    staged_skip: Optional[str] = None  # why what is staged is not to be swapped in
    attached: Optional[str] = None  # a standby: the domains whose definitions list it

    @property
    def running(self) -> bool:
        return self.domain_state not in ("shut off", "undefined")


@dataclass(frozen=True)
class Step:
    """One step of a box's plan. `implicit`: not asked for, required by one that is."""

    name: str  # kill, down, verify, create, mount, extract, store, restore, insert, release,
    # redefine, up
    description: str
    implicit: bool = False
    item: int = 0  # extract, insert: which of the request's transfers
    whole: bool = False  # verify, store, restore: the whole disk (plan.whole_disk), not the tree
    #: verify: the image's recorded digest is checked while the mount step that comes next
    #: maps and mounts the slot; the restore waits for the answer before it changes anything
    beside: bool = False
    standby: bool = False  # a step of a staging: it works on the standby disk

    def as_dict(self) -> dict:
        d = {"step": self.name, "description": self.description, "implicit": self.implicit}
        if self.standby:
            d["disk"] = "standby"
        return d


@dataclass(frozen=True)
class Verdict:
    """How the run ends, when the observed state already decides it."""

    exit_code: int
    message: str


@dataclass(frozen=True)
class Plan:
    box: str
    steps: Tuple[Step, ...]
    verdict: Optional[Verdict] = None

    @property
    def expected_exit(self) -> int:
        return self.verdict.exit_code if self.verdict else 0

    def as_dict(self) -> dict:
        d: dict = {"steps": [s.as_dict() for s in self.steps], "expected_exit_code":
                   self.expected_exit}
        if self.verdict:
            d["expected_error"] = self.verdict.message
        return d

    def text(self) -> str:
        """The plan as --dry-run prints it: a line a step, each field one line of text (a
        fleet worker's plan is drawn with this too: safe() keeps its values from starting a
        line of their own or rewriting the terminal)."""
        lines = [f"box {safe(self.box)}:"]
        lines += [f"  {i}. {safe(s.name)}{' (standby)' if s.standby else ''}"
                  f"{' (implicit)' if s.implicit else ''}: {safe(s.description)}"
                  for i, s in enumerate(self.steps, 1)]
        if self.verdict:
            lines.append(f"  the run would fail (exit {self.verdict.exit_code}): "
                         f"{safe(self.verdict.message)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, box: str, data: Any) -> Plan:
        """The plan as_dict() describes (a fleet worker's dry run), to print it with text();
        whatever JSON value stands for a field, a plan ("?" for what does not read)."""
        def text(value: Any) -> str:
            return value if isinstance(value, str) else "?"

        data = data if isinstance(data, dict) else {}
        steps = data.get("steps")
        steps = tuple(Step(text(s.get("step")), text(s.get("description")),
                           s.get("implicit") is True, standby=s.get("disk") == "standby")
                      if isinstance(s, dict) else Step("?", "?")
                      for s in (steps if isinstance(steps, list) else ()))
        code = data.get("expected_exit_code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else 0
        error = data.get("expected_error")
        return cls(box, steps, Verdict(code, text(error)) if error else None)


def dry_run_summary(code: int) -> str:
    """The last line of --dry-run: the code the run would exit with here."""
    return (f"(dry run: nothing was changed; the run would exit {code} here"
            f"{'' if code else ' unless something fails on the way'})\n")


def plan_box(req: Request, box: str, seen: Observed, *, lock_wait: int = 0) -> Plan:
    """The steps box goes through for req in state seen, and the verdict when seen decides it."""
    steps: List[Step] = []
    def add(name: str, text: str, implicit: bool = False, item: int = 0,
            whole: bool = False) -> None:
        steps.append(Step(name, text, implicit, item, whole))

    data = [a for a in req.actions if a in DATA_ACTIONS]
    if "up" in req.actions and seen.staged and not data and "swap" not in req.actions:
        req = replace(req, actions=tuple(a for a in PIPELINE if a in {*req.actions, "swap"}))
        swap_implicit = True
    else:
        swap_implicit = False
    whole = {a: whole_disk(a, req, seen) for a in data}
    stops = "kill" in req.actions or "down" in req.actions
    touches_fs = bool(data) or "mount" in req.actions
    stopped = stops  # the plan stops the domain before its end
    ready = False  # a step of this plan mounted the slot (or checked what is mounted)
    mounted = seen.mounted  # whether the slot is mounted at this point of the plan
    created = False

    def add_mount(implicit: bool) -> None:
        nonlocal created
        if seen.create and not created:
            add("create", seen.create, True)
            created = True
        add("mount", _mount_text(seen, mounted), implicit)

    if data:  # what the data steps need is proven before anything is touched: the domain too
        _add_verify(req, seen, add, whole.get("restore", False))
    for action in req.actions:
        if action == "kill":
            add("kill", "force the domain off (libvirt destroy)" if seen.running else
                f"nothing: the domain is {seen.domain_state}")
        elif action == "down":
            add("down", f"ACPI shutdown, forced off after {seen.timeout} s" if seen.running else
                f"nothing: the domain is {seen.domain_state}")
        elif action == "mount":
            add_mount(False)  # refused while the domain runs (no down)
            ready = mounted = True
        elif action in DATA_ACTIONS:
            if action == data[0] and "mount" not in req.actions:
                if seen.running and not stops:
                    add("down", f"ACPI shutdown first, forced off after {seen.timeout} s", True)
                    stopped = True
            if whole[action]:
                # the disk file must not change under the copy (a qcow2 slot's export holds it)
                add("release", "unmount, detach, stop an export: the whole disk is copied"
                    if mounted else "nothing mounted or mapped now", True)
                ready = mounted = False
            elif not ready:
                add_mount(True)
                ready = mounted = True
            _add_data(action, req, box, seen, whole[action], add)
            if action == data[-1] and not mounted and ("mount" in req.actions or seen.mounted):
                add("mount", "mount it again, as it was", True)
                ready = mounted = True
        elif action == "release":
            add("release", "unmount, detach the loop device(s)" if seen.mounted or touches_fs
                else "nothing mounted or mapped now")
        elif action == "redefine":
            add("redefine", "define the domain from the config through libvirt.xsl"
                if seen.domain_state == "undefined" else
                "replace libvirt's definition with the config's, through libvirt.xsl")
        elif action == "swap":
            if seen.running and not stopped:
                add("down", f"ACPI shutdown first, forced off after {seen.timeout} s", True)
                stopped = True
            if seen.mounted and "release" not in req.actions:
                add("release", "unmount, detach: the disk the domain leaves", True)
                mounted = False
            add("swap", f"make the standby disk {seen.standby} (image {seen.staged}, staged) "
                f"the domain's disk in libvirt's definition; {seen.disk} becomes the standby",
                swap_implicit)
        elif action == "up":
            if seen.store_type and "release" not in req.actions:
                add("release", "unmount, detach: never boot a disk mounted on the host"
                    if seen.mounted or touches_fs else "nothing mounted or mapped now", True)
            skipped = (f" (the staged image is not swapped in: {seen.staged_skip})"
                       if seen.staged_skip and "swap" not in req.actions else "")
            add("up", ("define the domain from the config through libvirt.xsl, start it"
                       if seen.domain_state == "undefined" else
                       "nothing: already running" if seen.running and not stopped else
                       "start the domain") + skipped)
    return Plan(box, _check_beside(steps, req, seen),
                _verdict(req, box, seen, stops, touches_fs, lock_wait))


def _check_beside(steps: List[Step], req: Request, seen: Observed) -> Tuple[Step, ...]:
    """The verify step whose mount and restore come right after it checks the recorded
    digest of the image to restore beside them (Step.beside): the restore waits for the
    answer before its first change. Anything else after a verify (a shutdown, a new disk, a
    store) changes what a corrupt image must leave as it was: the check ends first."""
    out = list(steps)
    for i, s in enumerate(out[:-2]):
        if s.name == "verify" and not s.whole and seen.checksum and \
                [t.name for t in out[i + 1:i + 3]] == ["mount", "restore"]:
            out[i] = replace(s, beside=True, description=_verify_text(req, seen, True))
    return tuple(out)


def plan_staged(req: Request, box: str, seen: Observed, spare: Optional[Observed], *,
                lock_wait: int = 0) -> Plan:
    """A --stage request: its restore and inserts on the standby disk (observed as `spare`,
    the slot BOX/standby, None when the slot has none), then with -u the swap and the start
    of the domain (observed as `seen`)."""
    if spare is None:
        return Plan(box, (), Verdict(EXIT_CONFIG if seen.in_config else EXIT_STATE,
                                     f"box '{box}' has no standby disk: set standby in its "
                                     "section (a second disk, as HostDisk or root)"))
    first = plan_box(req.staging(), box + "/standby", spare, lock_wait=lock_wait)
    steps = [replace(s, standby=True) for s in first.steps]
    verdict = first.verdict
    if verdict is None and req.restore is None and not seen.staged:
        verdict = Verdict(EXIT_STATE, f"box '{box}': nothing staged to insert into"
                          f"{': ' + seen.staged_skip if seen.staged_skip else ''}; stage an "
                          "image with -r NAME --stage")
    rest = req.swapping()
    if rest.actions:  # after the staging, what it staged is ready
        after = replace(seen, staged=req.restore or seen.staged, staged_skip=None)
        second = plan_box(rest, box, after, lock_wait=lock_wait)
        steps += second.steps
        verdict = verdict or second.verdict
    return Plan(box, tuple(steps), verdict)


#: Image formats that are whole disks (a qcow2 slot restores them as a new overlay).
DISK_IMAGE_FORMATS: Tuple[DiskFormat, ...] = tuple(DiskFormat)


def whole_disk(action: str, req: Request, seen: Observed) -> bool:
    """Whether a store or restore works on the whole disk (no mount): with --disk-image; on a
    qcow2 slot, a store without a format flag, and the restore of a disk image."""
    if action not in ("store", "restore"):
        return False
    if req.disk_image:
        return True
    if seen.store_type != "qcow2":
        return False
    if action == "store":
        return req.format is None
    return seen.images.get(req.restore or "") in DISK_IMAGE_FORMATS


def _add_verify(req: Request, seen: Observed, add: Callable[..., None], whole: bool) -> None:
    if req.restore is not None or req.inserts:
        add("verify", _verify_text(req, seen, False), True, whole=whole)


def _verify_text(req: Request, seen: Observed, beside: bool) -> str:
    image = [f"image {req.restore} ({seen.images.get(req.restore, MISSING)})"] \
        if req.restore is not None else []
    inserts = [f"insert {t.name} ({seen.inserts.get(t.name, MISSING)})" for t in req.inserts]
    if not beside:
        return (f"prove {', '.join(image + inserts)} restorable (its recorded digest, else a "
                "full read) before the slot is touched")
    text = (f"prove {image[0]} restorable by its recorded digest, checked while the slot is "
            "mounted, before the restore changes it")
    if inserts:
        text += (f"; {', '.join(inserts)} (its recorded digest, else a full read) before the "
                 "slot is touched")
    return text


def _add_data(action: str, req: Request, box: str, seen: Observed, whole: bool,
              add: Callable[..., None]) -> None:
    fmt = req.format or "rsync"
    if action == "extract":
        for i, t in enumerate(req.extracts):
            add("extract", f"archive guest {t.directory} as {req.extract_name(t.name, box)} "
                f"({fmt}) into the extracts store", item=i)
    elif action == "store":
        what = "the whole disk" if whole else f"the filesystem ({fmt})"
        add("store", f"write {what} as image {req.store_name(box)} under a temporary name, "
            "sync, put it in place atomically", whole=whole)
    elif action == "restore":
        name = req.restore or ""
        found = seen.images.get(name, MISSING)
        if seen.store_type == "qcow2" and whole:
            add("restore", f"replace the slot's disk with a new qcow2 overlay on image {name}",
                whole=True)
        elif whole:
            add("restore", f"write image {name} ({found}) over the whole disk (a reflink where "
                "possible) and rename it into place", whole=True)
        elif found == "rsync":
            add("restore", f"mirror image {name} (rsync --delete)")
        else:
            how = CLEAR_PLANS[seen.clear]
            add("restore", f"mark the slot, {how}, unpack image {name} ({found}) into a "
                "staging directory and move it into the guest, unmark the slot")
    elif action == "insert":
        for i, t in enumerate(req.inserts):
            add("insert", f"unpack insert {t.name} ({seen.inserts.get(t.name, MISSING)}) at "
                f"{t.directory}", item=i)


def _verdict(req: Request, box: str, seen: Observed, stops: bool, touches_fs: bool,
             lock_wait: int) -> Optional[Verdict]:
    """The exit code the real run ends with, when the observed state decides it."""
    disk_work = touches_fs or "release" in req.actions
    releases = disk_work or ("up" in req.actions and bool(seen.store_type))  # up releases first
    if seen.locked_by and lock_wait == 0:  # the run takes the lock before anything else
        return Verdict(EXIT_LOCKED, f"box '{box}' is locked by {seen.locked_by}; try again "
                       "later or wait with --lock-wait S")
    if disk_work and not seen.in_config:
        return Verdict(EXIT_STATE, f"box '{box}' is a libvirt domain with no slot in the "
                       "config; disk actions need a [vmim.vm.NAME] section with its HostDisk "
                       "or root")
    if disk_work and not seen.store_type:
        return Verdict(EXIT_CONFIG, f"box '{box}' has no disk: set HostDisk (and partition) or "
                       "root in its section")
    if releases and seen.conflict:
        return Verdict(EXIT_CONFIG, f"box '{box}': {seen.conflict}")
    if releases and not seen.root:
        return Verdict(EXIT_ENVIRONMENT, f"box '{box}': mounting and releasing its disk needs "
                       "root (mounting and loop devices)")
    for key in seen.missing_stores:
        return Verdict(EXIT_CONFIG, f"box '{box}': no {STORE_KINDS[key]} store configured: set {key} "
                       "in [vmim.local] or in the slot's section")
    if seen.unusable:
        return Verdict(EXIT_STATE, seen.unusable[0])
    if seen.running and seen.mounted and not set(req.actions) <= {"kill", "release"}:
        return Verdict(EXIT_STATE, f"box '{box}': its domain is {seen.domain_state} while its "
                       f"filesystem is mounted on the host at {seen.mount}: both may be writing "
                       "to it. Nothing else is done until that ends: force the domain off (-k) "
                       "and unmount it (--release), then check the filesystem")
    if seen.running and not stops and "redefine" in req.actions:
        return Verdict(EXIT_STATE, f"box '{box}': domain is {seen.domain_state}; --redefine "
                       "replaces a definition only while the domain is shut off: add -d (or -k)")
    if "redefine" in req.actions and not seen.in_config:
        return Verdict(EXIT_STATE, f"box '{box}' is a libvirt domain with no slot in the "
                       "config: there is no definition to replace it with")
    if seen.running and not stops and "mount" in req.actions:
        return Verdict(EXIT_STATE, f"box '{box}': domain is {seen.domain_state}; add -d to shut "
                       "it down first (or -k to force it off)")
    if seen.held_by and touches_fs and not seen.running:  # a running domain is stopped first
        return Verdict(EXIT_STATE, f"box '{box}': {seen.held_by}")
    if seen.pinned and releases:
        return Verdict(EXIT_CLEANUP, f"box '{box}': its disk is still mounted in another mount "
                       f"namespace: {seen.pinned}")
    if "swap" in req.actions and not seen.standby:
        return Verdict(EXIT_CONFIG, f"box '{box}' has no standby disk: set standby in its "
                       "section (a second disk, as HostDisk or root) to stage images into")
    if "swap" in req.actions and not seen.staged:
        return Verdict(EXIT_STATE, f"box '{box}': nothing to swap in: "
                       f"{seen.staged_skip or 'no image is staged (stage one with -r NAME --stage)'}")
    if seen.attached and disk_work:
        return Verdict(EXIT_STATE, f"box '{box}': {seen.attached}")
    if seen.incomplete and "up" in req.actions and req.restore is None and \
            "swap" not in req.actions:
        return Verdict(EXIT_STATE, f"box '{box}': the restore of '{seen.incomplete}' did not "
                       "finish, so its filesystem is incomplete and it is not started; restore "
                       f"an image into it (vmimagemanager -b {box} -r NAME -u)")
    return None


def _mount_text(seen: Observed, mounted: bool) -> str:
    if not seen.in_config:
        return "no slot in the config: nothing to mount"
    if mounted:
        return f"already mounted at {seen.mount}: check it is this slot's filesystem"
    via = {"kpartx": "a loop device at the partition's offset",
           "partition": "a loop device (or the block device itself)",
           "lvm": "the logical volume",
           "qcow2": "a qemu-storage-daemon FUSE export and a loop device"}.get(
        seen.store_type or "", "?")
    return f"map {seen.disk} through {via}, mount it at {seen.mount}"
