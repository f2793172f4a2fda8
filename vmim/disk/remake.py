"""Re-making a slot's filesystem as it was, or deciding it cannot be: the `clear` of a restore.

`clear = "auto"` (the default) re-makes the filesystem only when the re-made one is the same
as the one there: same type, UUID and label, and the same features, geometry and superblock
defaults the guest sees (ext2/3/4: what `dumpe2fs -h` shows; xfs: the superblock `xfs_db`
prints, with its feature list). The parameters are read from the filesystem and turned into
the arguments of mkfs (and of tune2fs/debugfs for what mke2fs cannot set); then mkfs itself
decides: the same commands run first on a sparse file of the same size in a private
directory, and the superblock they make is compared with the original field by field. Only
counts of used and free blocks and inodes, timestamps, mount counts and the journal's state
(which the kernel sets at the next mount) may differ. Anything else that differs (a feature
or a layout mke2fs/mkfs.xfs does not reproduce, an external log, a realtime section, a
filesystem of another type) is a reason to delete the content instead, and that reason is
what the run reports. The real re-make is compared again afterwards.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from vmim import process, scratch
from vmim.disk import Filesystem
from vmim.errors import CommandError, ToolMissingError

log = logging.getLogger(__name__)

EXT = ("ext2", "ext3", "ext4")
#: stands for the device in Remake.commands: with a NUL, which no argument can hold, so no
#: label or other value read from the guest's filesystem can be taken for it
DEVICE = "\0device"

#: dumpe2fs -h fields that are not parameters: counts, times, mount state, the journal's
#: state (the kernel sets the journal's features at the first mount), checksums of these.
EXT_VOLATILE = frozenset({
    "Last mounted on", "Filesystem state", "Free blocks", "Free inodes", "Filesystem created",
    "Last mount time", "Last write time", "Mount count", "Last checked", "Lifetime writes",
    "Checksum", "First orphan inode", "Journal features", "Journal sequence", "Journal start",
    "Journal checksum type", "Journal checksum", "Journal errno", "Last error time",
    "First error time", "First error function", "First error line", "First error inode",
    "First error block", "Last error function", "Last error line", "Last error inode",
    "Last error block", "FS Error count", "MMP block number", "Next check after",
})
#: features that are the filesystem's state, not how it was made
EXT_STATE_FEATURES = frozenset({"needs_recovery", "orphan_present"})

#: tune2fs -o names of the default mount options dumpe2fs shows (one bit each)
EXT_MOUNT_DEFAULTS = ("debug", "bsdgroups", "user_xattr", "acl", "uid16", "nobarrier",
                      "block_validity", "discard", "nodelalloc")
#: the journalling mode: two bits, journal_data_writeback is both
EXT_JOURNAL_MODES = ("journal_data", "journal_data_ordered", "journal_data_writeback")
EXT_ERRORS = {"Continue": "continue", "Remount read-only": "remount-ro", "Panic": "panic"}
EXT_FLAGS = {"signed_directory_hash": 0x1, "unsigned_directory_hash": 0x2,
             "test_filesystem": 0x4}

#: xfs_db `sb 0` fields that are counts, log state or quota state
XFS_VOLATILE = frozenset({"icount", "ifree", "fdblocks", "frextents", "lsn", "crc",
                          "inprogress", "qflags", "uquotino", "gquotino", "pquotino",
                          "features_log_incompat"})
XFS_VERSION_ATTRBIT = 0x10


class NotSame(Exception):
    """The filesystem cannot be re-made the same: why (one line)."""


@dataclass(frozen=True)
class Remake:
    """How to re-make one filesystem the same."""

    fs: Filesystem
    size: int  # bytes the filesystem spans on its device
    commands: Tuple[Tuple[str, ...], ...]  # DEVICE stands for the device
    fields: Dict[str, str] = field(default_factory=dict)  # what the re-made one must show

    def run(self, device: str, *, trial: bool = False) -> None:
        for argv in self.commands:
            parts = [device if a == DEVICE else a for a in argv]
            if trial and parts[0] == "mke2fs":  # a file's journal need not be zeroed
                at = parts.index("-E") + 1
                parts[at] += ",lazy_journal_init=1"
            process.run(parts, capture=True)

    def differences(self, device: str) -> List[str]:
        """The fields of the filesystem on device that differ from the original's."""
        now = read_fields(self.fs.type, device)
        return ([f"{k} {now.get(k, '(none)')!r}, was {v!r}" for k, v in self.fields.items()
                 if now.get(k) != v]
                + [f"{k} {now[k]!r}, not there before" for k in now if k not in self.fields])


@dataclass(frozen=True)
class Choice:
    """The clear a restore runs: "mkfs" (as `remake` says, or with the type's defaults when
    it is None) or "delete", and why."""

    method: str
    why: str
    remake: Optional[Remake] = None

    def as_dict(self) -> dict:
        return {"method": self.method, "why": self.why}


def choose(setting: str, device: str, fs: Filesystem, mountpoint: str) -> Choice:
    """The clear for a slot's mounted filesystem; `setting` is the slot's clear (auto, mkfs,
    delete). For auto and mkfs its parameters are read and the re-make tried on a file."""
    if setting == "delete":
        return Choice("delete", 'clear = "delete" in the config')
    try:
        how = plan_remake(fs, device, mountpoint)
        try_on_file(how)
    except (ToolMissingError, OSError) as exc:  # no dumpe2fs, no room for the trial...
        return _not_same(setting, fs, NotSame(f"it cannot be read and tried here: {exc}"))
    except NotSame as exc:
        return _not_same(setting, fs, exc)
    return Choice("mkfs", f"the same {fs.type} re-made ({_summary(how)})", how)


def _not_same(setting: str, fs: Filesystem, exc: Exception) -> Choice:
    if setting == "mkfs":
        return Choice("mkfs", f'clear = "mkfs": a new {fs.type} with its defaults, the '
                      f"same UUID and label (not the same filesystem: {exc})")
    return Choice("delete", f"the {fs.type} filesystem cannot be re-made the same: {exc}")


def _summary(how: Remake) -> str:
    f = how.fields
    if how.fs.type in EXT:
        return (f"{f.get('Block count')} blocks of {f.get('Block size')}, "
                f"{f.get('Inode count')} inodes of {f.get('Inode size')} bytes, "
                f"features {f.get('Filesystem features')}")
    return (f"{f.get('dblocks')} blocks of {f.get('blocksize')}, {f.get('agcount')} AGs, "
            f"inodes of {f.get('inodesize')} bytes, features {f.get('version', '?')}")


def try_on_file(how: Remake) -> None:
    """Run the re-make on a sparse file of the same size and compare: NotSame when mkfs
    refuses or makes something else."""
    with scratch.directory("remake", memory=True) as tmp:  # a sparse file: little memory
        path = os.path.join(tmp, "fs")
        with open(path, "wb") as fh:
            fh.truncate(how.size)
        try:
            how.run(path, trial=True)
            diff = how.differences(path)
        except CommandError as exc:
            raise NotSame(f"{os.path.basename(exc.argv[0])} refused: "
                          f"{exc.stderr_tail.strip()}") from None
        except ToolMissingError as exc:
            raise NotSame(str(exc)) from None
        if diff:
            raise NotSame("mkfs makes it with " + "; ".join(diff[:4]))


def plan_remake(fs: Filesystem, device: str, mountpoint: str) -> Remake:
    """The commands that re-make fs the same, from its parameters (NotSame when they cannot)."""
    if fs.type in EXT:
        return _plan_ext(fs, device)
    if fs.type == "xfs":
        return _plan_xfs(fs, device, mountpoint)
    raise NotSame(f"vmimagemanager reads the parameters of ext2/3/4 and xfs, not of {fs.type}")


def read_fields(fstype: str, device: str) -> Dict[str, str]:
    """The fields of a filesystem that a re-make must keep."""
    return _ext_fields(device) if fstype in EXT else _xfs_fields(device)


def generic_commands(fs: Filesystem) -> Tuple[Tuple[str, ...], ...]:
    """clear = "mkfs" where the filesystem cannot be re-made the same: the type's defaults,
    the same UUID and label (1.x's re-make). No discard: trimming the whole device first
    would cost more than the restore saves."""
    if fs.type == "xfs":
        argv: List[str] = ["mkfs.xfs", "-q", "-f", "-K", "-m", f"uuid={fs.uuid}"]
    elif fs.type == "btrfs":
        argv = ["mkfs.btrfs", "-q", "-f", "--nodiscard", "-U", fs.uuid]
    else:
        argv = [f"mkfs.{fs.type}", "-q", "-F", "-E", "nodiscard", "-U", fs.uuid]
    if fs.label:
        argv += ["-L", fs.label]
    return ((*argv, DEVICE),)


# --------------------------------------------------------------------------- ext2/3/4


def parse_dumpe2fs(text: str) -> Dict[str, str]:
    """`Key:   value` lines of dumpe2fs -h, values with their spaces folded."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith(" ") and value[:1] in (" ", "\t", ""):
            out.setdefault(key.strip(), " ".join(value.split()))
    return out


def _ext_fields(device: str) -> Dict[str, str]:
    try:
        res = process.run(["dumpe2fs", "-h", "--", device], capture=True)
    except CommandError as exc:
        raise NotSame(f"dumpe2fs cannot read it: {exc.stderr_tail.strip()}") from None
    fields = parse_dumpe2fs(res.stdout)
    if "Filesystem features" in fields:
        fields["Filesystem features"] = " ".join(
            f for f in fields["Filesystem features"].split() if f not in EXT_STATE_FEATURES)
    return {k: v for k, v in fields.items() if k not in EXT_VOLATILE}


def _int(fields: Dict[str, str], key: str) -> int:
    try:
        return int(fields[key].split()[0])
    except (KeyError, ValueError, IndexError):
        raise NotSame(f"dumpe2fs shows no {key}") from None


def _plan_ext(fs: Filesystem, device: str) -> Remake:
    f = _ext_fields(device)
    features = f.get("Filesystem features", "").split()
    bs = _int(f, "Block size")
    blocks = _int(f, "Block count")
    if "Journal device" in f or "Journal UUID" in f or "journal_dev" in features:
        raise NotSame("its journal is on another device")
    mkfs = ["mke2fs", "-q", "-F", "-t", fs.type, "-O", ",".join(["none", *features]),
            "-b", str(bs), "-I", str(_int(f, "Inode size")), "-N", str(_int(f, "Inode count")),
            "-m", "0", "-U", fs.uuid, "-L", fs.label]
    if "bigalloc" in features:
        mkfs += ["-C", str(_int(f, "Cluster size"))]
    else:
        mkfs += ["-g", str(_int(f, "Blocks per group"))]
    if "flex_bg" in features:
        mkfs += ["-G", str(_int(f, "Flex block group size"))]
    errors = EXT_ERRORS.get(f.get("Errors behavior", ""))
    if errors is None:
        raise NotSame(f"errors behaviour {f.get('Errors behavior')!r}")
    mkfs += ["-e", errors, "-o", f.get("Filesystem OS type", "Linux").lower(),
             "-r", f.get("Filesystem revision #", "1").split()[0]]
    if "has_journal" in features and "Total journal blocks" in f:
        fast = _int(f, "Fast commit length") * bs if "Fast commit length" in f else 0
        journal = _int(f, "Total journal blocks") * bs  # mke2fs's size counts fast commits
        mib = 1024 * 1024
        if journal % mib or fast % mib:
            raise NotSame(f"a journal of {journal} bytes: mke2fs takes whole MiB")
        mkfs += ["-J", f"size={journal // mib}"
                 + (f",fast_commit_size={fast // mib}" if fast else "")]
    extended = ["nodiscard"]
    for key, opt in (("RAID stride", "stride"), ("RAID stripe width", "stripe_width"),
                     ("MMP update interval", "mmp_update_interval")):
        if key in f:
            extended.append(f"{opt}={_int(f, key)}")
    if "Character encoding" in f:
        extended.append(f"encoding={f['Character encoding']}")
    if "Backup block groups" in f:
        extended.append(f"num_backup_sb={len(f['Backup block groups'].split())}")
    quota = [q for q, key in (("usrquota", "User quota inode"), ("grpquota", "Group quota inode"),
                              ("prjquota", "Project quota inode")) if key in f]
    if quota:
        extended.append("quotatype=" + ":".join(quota))
    if "test_filesystem" in f.get("Filesystem flags", "").split():
        extended.append("test_fs")
    mkfs += ["-E", ",".join(extended), "--", DEVICE, str(blocks)]

    tune = ["tune2fs", "-r", str(_int(f, "Reserved block count")),
            "-c", str(_int(f, "Maximum mount count")), "-i", f"{_int(f, 'Check interval')}s",
            "-u", str(_int(f, "Reserved blocks uid")), "-g", str(_int(f, "Reserved blocks gid"))]
    defaults = f.get("Default mount options", "(none)").split()
    defaults = [] if defaults == ["(none)"] else defaults
    unknown = [o for o in defaults if o not in EXT_MOUNT_DEFAULTS + EXT_JOURNAL_MODES]
    if unknown:
        raise NotSame(f"default mount options tune2fs does not set: {' '.join(unknown)}")
    mode = [o for o in defaults if o in EXT_JOURNAL_MODES]
    tune += ["-o", ",".join(["^journal_data_writeback", *mode,
                             *(o if o in defaults else f"^{o}" for o in EXT_MOUNT_DEFAULTS)])]
    ext = []
    if "Default directory hash" in f:
        ext.append(f"hash_alg={f['Default directory hash']}")
    if "Mount options" in f:
        if re.search(r"[,\s]", f["Mount options"]):
            raise NotSame(f"mount options {f['Mount options']!r}: tune2fs -E takes no commas")
        ext.append(f"mount_opts={f['Mount options']}")
    if ext:
        tune += ["-E", ",".join(ext)]
    flags = sum(v for k, v in EXT_FLAGS.items() if k in f.get("Filesystem flags", "").split())
    commands: List[Tuple[str, ...]] = [tuple(mkfs), (*tune, "--", DEVICE),
                                       ("debugfs", "-w", "-R", f"ssv flags {flags}", DEVICE)]
    if "Directory Hash Seed" in f:  # mke2fs makes a random one
        commands.append(("debugfs", "-w", "-R", f"ssv hash_seed {f['Directory Hash Seed']}",
                         DEVICE))
    return Remake(fs, blocks * bs, tuple(commands), f)


# --------------------------------------------------------------------------- xfs


def parse_xfs_info(text: str) -> Dict[str, str]:
    """xfs_info's geometry as section.key (meta-data.isize, data.bsize, log.blocks, ...)."""
    out: Dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        head, sep, rest = line.partition("=")
        if not sep:
            continue
        if head.strip():
            section = head.strip()
            first = rest.split(" ", 1)[0]
            if first and "=" not in first:
                out[f"{section}.name"] = first
        for key, value in re.findall(r"([\w-]+)=([^\s,]+)", rest):
            out[f"{section}.{key}"] = value
        if section == "log" and "internal log" in line:
            out["log.internal"] = "1"
        m = re.match(r"version\s+(\d+)", rest)
        if section == "naming" and m:
            out["naming.version"] = m.group(1)
    return out


def _xfs_fields(device: str) -> Dict[str, str]:
    """The superblock of an xfs (xfs_db `sb 0`) and its feature list (`version`)."""
    try:
        res = process.run(["xfs_db", "-r", "-c", "version", "-c", "sb 0", "-c", "print", "--",
                           device], capture=True)
    except CommandError as exc:
        raise NotSame(f"xfs_db cannot read it: {exc.stderr_tail.strip()}") from None
    out: Dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            out.setdefault("version" if key.startswith("versionnum [") else key.strip(),
                           value.strip())
    # XFS sets the ATTR bit when the first extended attribute is written: use, not making
    if "versionnum" in out:
        out["versionnum"] = hex(int(out["versionnum"], 16) & ~XFS_VERSION_ATTRBIT)
    if "version" in out:
        out["version"] = ",".join(f for f in out["version"].split(",") if f != "ATTR")
    return {k: v for k, v in out.items() if k not in XFS_VOLATILE}


def _plan_xfs(fs: Filesystem, device: str, mountpoint: str) -> Remake:
    try:
        res = process.run(["xfs_info", mountpoint], capture=True)
    except CommandError as exc:
        raise NotSame(f"xfs_info cannot read it: {exc.stderr_tail.strip()}") from None
    g = parse_xfs_info(res.stdout)
    fields = _xfs_fields(device)

    def get(key: str) -> str:
        if key not in g:
            raise NotSame(f"xfs_info shows no {key}")
        return g[key]

    if g.get("realtime.name", "none") != "none" or get("realtime.blocks") != "0":
        raise NotSame("it has a realtime section")
    if "log.internal" not in g:
        raise NotSame("its log is on another device")
    bsize = int(get("data.bsize"))
    crc = get("meta-data.crc")
    meta = [f"crc={crc}", f"uuid={fs.uuid}"]
    inode = [f"size={get('meta-data.isize')}", f"maxpct={get('data.imaxpct')}"]
    naming = [f"size={get('naming.bsize')}", f"version={g.get('naming.version', '2')}"]
    log_opts = ["internal", f"size={int(get('log.blocks')) * bsize}",
                f"version={get('log.version')}"]
    if crc == "1":
        meta += [f"{k}={g[f'meta-data.{k}']}" for k in ("finobt", "rmapbt", "reflink", "bigtime",
                                                        "inobtcount") if f"meta-data.{k}" in g]
        inode.append(f"sparse={get('meta-data.sparse')}")
        if "meta-data.nrext64" in g:
            inode.append(f"nrext64={g['meta-data.nrext64']}")
    else:
        inode += [f"attr={get('meta-data.attr')}", f"projid32bit={get('meta-data.projid32bit')}"]
        naming.append(f"ftype={get('naming.ftype')}")
        log_opts.append(f"lazy-count={get('log.lazy-count')}")
    if g.get("naming.ascii-ci", "0") != "0":
        naming.append("ascii-ci=1")
    data = [f"agcount={get('meta-data.agcount')}", f"size={int(get('data.blocks')) * bsize}"]
    sunit, swidth = int(get("data.sunit")), int(get("data.swidth"))
    if sunit:
        data += [f"sunit={sunit * bsize // 512}", f"swidth={swidth * bsize // 512}"]
    lsunit = int(get("log.sunit"))
    if lsunit:
        log_opts.append(f"su={lsunit * bsize}")
    sectsz = get("meta-data.sectsz")
    if get("log.sectsz") != sectsz:
        log_opts.append(f"sectsize={get('log.sectsz')}")
    argv: Tuple[str, ...] = (
        "mkfs.xfs", "-q", "-f", "-K", "-b", f"size={bsize}", "-s", f"size={sectsz}",
        "-m", ",".join(meta), "-i", ",".join(inode), "-d", ",".join(data),
        "-n", ",".join(naming), "-l", ",".join(log_opts),
        *(("-L", fs.label) if fs.label else ()), DEVICE)
    return Remake(fs, int(get("data.blocks")) * bsize, (argv,), fields)


def how(choice: Choice, fs: Filesystem) -> Remake:
    """What the re-make choice says runs on fs: the same filesystem's commands, or (clear =
    "mkfs" where it cannot be the same) the type's defaults with its UUID and label."""
    return choice.remake if choice.remake is not None else Remake(fs, 0, generic_commands(fs))


def remake(how: Remake, device: str) -> None:
    """Re-make the (unmounted) filesystem on device; then compare it with the original when
    it was to be the same (a difference is logged: the trial on a file made the same commands
    give the same filesystem)."""
    how.run(device)
    if not how.fields:
        return
    try:
        diff = how.differences(device)
    except NotSame as exc:  # dumpe2fs or xfs_db cannot read what mkfs made
        diff = [str(exc)]
    if diff:
        log.warning("the re-made %s on %s differs from the one before: %s", how.fs.type, device,
                    "; ".join(diff))


# --------------------------------------------------------------------------- the record

#: the programs a re-make runs: a record read back names no other
PROGRAMS = frozenset({"mke2fs", "tune2fs", "debugfs", "mkfs.xfs", "mkfs.btrfs", "mkfs.ext2",
                      "mkfs.ext3", "mkfs.ext4"})


def to_record(how: Remake) -> Dict[str, Any]:
    """The re-make as JSON, written (vmim.incomplete.write_remake) before the filesystem is
    unmounted for it: a re-make that a kill or a crash interrupts leaves no filesystem, or
    one half made, and what was there cannot be read again; the next restore runs these."""
    return {"type": how.fs.type, "uuid": how.fs.uuid, "label": how.fs.label,
            "size": how.size, "commands": [list(argv) for argv in how.commands],
            "fields": dict(how.fields)}


def from_record(doc: Any) -> Remake:
    """A record to_record() wrote, read back from the state directory; ValueError when it
    is not one: each command one of PROGRAMS with the device among its arguments."""
    if not isinstance(doc, dict) or set(doc) != {"type", "uuid", "label", "size", "commands",
                                                 "fields"}:
        raise ValueError("not a re-make record")
    fstype, uuid, label = doc["type"], doc["uuid"], doc["label"]
    if fstype not in (*EXT, "xfs", "btrfs") or not isinstance(uuid, str) or \
            not isinstance(label, str):
        raise ValueError("its filesystem is not one vmimagemanager re-makes")
    size, commands, fields = doc["size"], doc["commands"], doc["fields"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("its size is not a count of bytes")
    if not isinstance(commands, list) or not commands or not all(
            isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
            and argv[0] in PROGRAMS and DEVICE in argv for argv in commands):
        raise ValueError("its commands are not a re-make's")
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in fields.items()):
        raise ValueError("its fields are not a superblock's")
    return Remake(Filesystem(fstype, uuid, label), size,
                  tuple(tuple(argv) for argv in commands), dict(fields))
