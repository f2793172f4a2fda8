"""The vocabulary that travels between the command line, the plan, the fleet's messages and
--json: actions (the pipeline's steps), lists, store and extract formats, disk image formats,
store types. Each word is a `str` Enum: a member is equal to, hashes as, and prints and
serialises as its word (JSON, f-strings, %-formatting, joins), on every Python version, so
output stays what it was with plain strings; a word outside the vocabulary is a ValueError
where it is made."""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A word of the vocabulary: a str whose str() and format() are the word itself (a plain
    `(str, Enum)` formats as `Class.NAME` from Python 3.12)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class Action(Word):
    """The per-box pipeline, in the order it runs whatever the order of the flags."""

    KILL = "kill"
    DOWN = "down"
    MOUNT = "mount"
    EXTRACT = "extract"
    STORE = "store"
    RESTORE = "restore"
    INSERT = "insert"
    RELEASE = "release"
    REDEFINE = "redefine"
    SWAP = "swap"
    UP = "up"


class ListKind(Word):
    """What -l, -L, --list-inserts, -f and -m list."""

    BOXES = "boxes"
    IMAGES = "images"
    INSERTS = "inserts"
    FREE = "free"
    LOCKED = "locked"


class Format(Word):
    """The formats of store and extract (-y, -z, -w, --zstd)."""

    RSYNC = "rsync"
    TGZ = "tgz"
    CPIO_BZ2 = "cpio.bz2"
    TAR_ZST = "tar.zst"


class DiskFormat(Word):
    """The formats of an image stored with --disk-image (disk_image_format)."""

    QCOW2 = "qcow2"
    RAW = "raw"


class StoreType(Word):
    """How a slot's disk is reached (store_type)."""

    PARTITION = "partition"
    KPARTX = "kpartx"
    LVM = "lvm"
    QCOW2 = "qcow2"
