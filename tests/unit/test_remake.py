"""The parameters of a filesystem as vmim.disk.remake reads them, and the mkfs arguments it
makes of them (recorded dumpe2fs -h and xfs_info output; the integration tests run them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmim.disk import Filesystem, remake
from vmim.errors import ToolMissingError

RECORDED = Path(__file__).parent / "recorded"


def _argv(cmd):
    return list(cmd)


@pytest.fixture
def ext4(monkeypatch):
    fields = remake.parse_dumpe2fs((RECORDED / "dumpe2fs-h-ext4.txt").read_text())
    monkeypatch.setattr(remake, "_ext_fields", lambda device: dict(fields))
    return fields


def test_dumpe2fs_fields_are_read_whole():
    f = remake.parse_dumpe2fs((RECORDED / "dumpe2fs-h-ext4.txt").read_text())
    assert f["Inode size"] == "128"
    assert f["Filesystem volume name"] == "lab"
    assert f["Default mount options"] == "user_xattr acl"
    assert f["Check interval"] == "100 (0:01:40)"
    assert f["Total journal blocks"] == "8192"
    assert "metadata_csum" not in f["Filesystem features"].split()


def test_ext4_parameters_become_mke2fs_tune2fs_and_debugfs_arguments(ext4):
    how = remake.plan_remake(Filesystem("ext4", ext4["Filesystem UUID"], "lab"), "/dev/x", "/m")
    mkfs, tune, flags, seed = (_argv(c) for c in how.commands)
    assert mkfs[:3] == ["mke2fs", "-q", "-F"]
    for opt, value in (("-I", "128"), ("-N", "131072"), ("-b", "4096"), ("-g", "32768"),
                       ("-G", "16"), ("-J", "size=32"), ("-L", "lab"), ("-e", "continue"),
                       ("-U", ext4["Filesystem UUID"])):
        assert mkfs[mkfs.index(opt) + 1] == value, opt
    assert mkfs[mkfs.index("-O") + 1].split(",")[0] == "none"  # exactly these features
    assert mkfs[-2:] == [remake.DEVICE, "262144"]
    assert tune[tune.index("-r") + 1] == "2621" and tune[tune.index("-i") + 1] == "100s"
    assert "user_xattr" in tune[tune.index("-o") + 1].split(",")
    assert "^debug" in tune[tune.index("-o") + 1].split(",")
    assert flags == ["debugfs", "-w", "-R", "ssv flags 1", remake.DEVICE]
    assert seed[3] == f"ssv hash_seed {ext4['Directory Hash Seed']}"


def test_an_external_journal_is_not_re_made(ext4):
    ext4["Journal UUID"] = "0b1c2d3e-0000-0000-0000-000000000000"
    with pytest.raises(remake.NotSame, match="journal is on another device"):
        remake.plan_remake(Filesystem("ext4", "u", ""), "/dev/x", "/m")


def test_another_type_is_not_re_made():
    with pytest.raises(remake.NotSame, match="not of btrfs"):
        remake.plan_remake(Filesystem("btrfs", "u", ""), "/dev/x", "/m")


def test_clear_delete_reads_nothing(monkeypatch):
    monkeypatch.setattr(remake, "plan_remake", lambda *a: pytest.fail("read the filesystem"))
    choice = remake.choose("delete", "/dev/x", Filesystem("ext4", "u", ""), "/m")
    assert (choice.method, choice.why) == ("delete", 'clear = "delete" in the config')


def test_xfs_info_geometry_becomes_mkfs_xfs_arguments(monkeypatch):
    text = (RECORDED / "xfs_info.txt").read_text()
    g = remake.parse_xfs_info(text)
    assert g["meta-data.isize"] == "512" and g["meta-data.reflink"] == "0"
    assert g["log.internal"] == "1" and g["realtime.name"] == "none"

    class Res:
        stdout = text

    monkeypatch.setattr(remake.process, "run", lambda *a, **k: Res())
    monkeypatch.setattr(remake, "_xfs_fields", lambda device: {})
    how = remake.plan_remake(Filesystem("xfs", "u-u-i-d", "xl"), "/dev/x", "/m")
    argv = _argv(how.commands[0])
    assert argv[argv.index("-m") + 1] == ("crc=1,uuid=u-u-i-d,finobt=1,rmapbt=0,reflink=0,"
                                          "bigtime=1,inobtcount=1")
    assert argv[argv.index("-d") + 1] == "agcount=4,size=1073741824"
    assert argv[argv.index("-l") + 1] == "internal,size=67108864,version=2"
    assert how.size == 1073741824


@pytest.mark.parametrize("setting, method", [("auto", "delete"), ("mkfs", "mkfs")])
def test_without_dumpe2fs_auto_deletes_and_mkfs_uses_the_defaults(monkeypatch, setting, method):
    def missing(*a, **k):
        raise ToolMissingError("dumpe2fs")

    monkeypatch.setattr(remake.process, "run", missing)
    choice = remake.choose(setting, "/dev/x", Filesystem("ext4", "u", ""), "/m")
    assert choice.method == method and choice.remake is None
    assert "required program 'dumpe2fs' was not found" in choice.why


# ------------------------------------------------------------------ the record of a re-make


def test_a_re_make_recorded_reads_back_the_same(ext4):
    import json

    how = remake.plan_remake(Filesystem("ext4", ext4["Filesystem UUID"], "lab"), "/dev/x", "/m")
    back = remake.from_record(json.loads(json.dumps(remake.to_record(how))))
    assert back == how
    plain = remake.how(remake.Choice("mkfs", "defaults"), Filesystem("xfs", "u-1", "l b"))
    back = remake.from_record(json.loads(json.dumps(remake.to_record(plain))))
    assert back.commands == (("mkfs.xfs", "-q", "-f", "-K", "-m", "uuid=u-1", "-L", "l b",
                              remake.DEVICE),)
    assert back.fields == {}


@pytest.mark.parametrize("change, why", [
    (lambda r: r["commands"].append(["sh", "-c", "reboot", remake.DEVICE]), "commands"),
    (lambda r: r["commands"].append(["/tmp/mke2fs", remake.DEVICE]), "commands"),
    (lambda r: r["commands"][0].remove(remake.DEVICE), "commands"),  # on another device
    (lambda r: r.update(commands=[]), "commands"),
    (lambda r: r["commands"][0].append(7), "commands"),
    (lambda r: r.update(type="vfat"), "filesystem"),
    (lambda r: r.update(size=True), "size"),
    (lambda r: r["fields"].update({"Inode size": 128}), "fields"),
    (lambda r: r.update(extra=1), "not a re-make record"),
])
def test_a_record_not_as_written_is_refused(change, why):
    record = remake.to_record(remake.how(remake.Choice("mkfs", "defaults"),
                                         Filesystem("ext4", "u", "")))
    change(record)
    with pytest.raises(ValueError, match=why):
        remake.from_record(record)


def test_only_the_device_is_put_in_for_the_device(monkeypatch):
    """The placeholder holds a NUL, which no argument can: a guest's label spelled as the
    placeholder once was ("{device}") stays the label."""
    ran = []
    monkeypatch.setattr(remake.process, "run", lambda argv, **k: ran.append(argv))
    how = remake.how(remake.Choice("mkfs", "defaults"), Filesystem("ext4", "u", "{device}"))
    remake.remake(how, "/dev/loop7")
    assert ran == [["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-U", "u", "-L", "{device}",
                    "/dev/loop7"]]
