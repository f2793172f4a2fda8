"""Config reader: both formats, defaults, derivation, every error at once."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from vmim import config
from vmim.config import KEYS, Slot
from vmim.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CURRENT = """\
[vmim.local]
vmemulator = "qemu:///system"
VMIMAGES = /srv/images
vmextracts = "/srv/extracts"
mount = "/mnt/slots/"
memory = 1048576

[vmim.vm.1]
HostName = "web1"
HostDisk = "/var/lib/libvirt/images/web1.img"
partition = 2

[vmim.vm.builder]
hostname = build2
ROOT = /dev/vg0/build2-root
swap = /dev/vg0/build2-swap
mac = "02:00:00:00:00:02"
memory = 524288
vmimages = "/srv/other-images"

[vmim.vm.nodisk]
HostName = "bare"
"""

LEGACY = """\
[VmImageManager]
vmimages = /server/vmstore/images
vmextracts = /server/vmstore/extracts
virthost = qemu:///session
vAlocatedMemory = 262144
vmconfdir = /etc/xen/vms
xenconftemplate = /etc/vmimagemanager/xen.template
mount = /mnt/legacy

[vm002.yokel.org]
vm_slot_enabled = on
HostName = vm002.yokel.org
root = /dev/vg/vm002-root
swap = /dev/vg/vm002-swap
mac = 02:16:80:00:00:02
ip = 192.0.2.2

[slot3]
vm_slot_enabled = Yes
HostDisk = /var/lib/images/slot3.img
partition = 1
memory = 131072

[disabled]
vm_slot_enabled = off
HostName = never
root = /dev/vg/never

[not-a-slot]
HostName = also-never
root = /dev/vg/also-never
"""


def test_current_format_slots_values_and_defaults():
    cfg = config.parse(CURRENT, "/etc/x.cfg")
    assert cfg.format == "current"
    assert cfg.slot_names == ["web1", "build2", "bare"]
    web1 = cfg.slot("web1")
    assert web1.section == "vmim.vm.1"
    assert web1.store_type == "kpartx"
    assert web1.partition == 2
    assert web1.mount == "/mnt/slots/web1"
    assert web1.vmimages == "/srv/images"  # bare value, upper-case key, from [vmim.local]
    assert web1.vminserts == web1.vmextracts == "/srv/extracts"
    assert web1.memory == 1048576  # [vmim.local] default
    b = cfg.slot("build2")
    assert b.store_type == "partition"
    assert b.root == "/dev/vg0/build2-root"
    assert b.mac == ("02:00:00:00:00:02",)  # a single string is a one-element list
    assert b.memory == 524288
    assert b.vmimages == "/srv/other-images"
    assert cfg.slot("bare").store_type is None
    assert cfg.slot("bare").describe_disk() == "-"
    assert cfg.image_dirs() == ["/srv/images", "/srv/other-images"]
    assert cfg.insert_dirs() == ["/srv/extracts"]


def test_legacy_format_enabled_sections_plain_values_and_renamed_keys():
    cfg = config.parse(LEGACY, "/etc/legacy.cfg")
    assert cfg.format == "legacy"
    assert cfg.uri == "qemu:///session"
    assert cfg.slot_names == ["vm002.yokel.org", "slot3"]
    vm = cfg.slot("vm002.yokel.org")
    assert vm.store_type == "partition"
    assert vm.mac == ("02:16:80:00:00:02",)
    assert vm.memory == 262144  # vAlocatedMemory became memory
    assert vm.mount == "/mnt/legacy/vm002.yokel.org"
    s3 = cfg.slot("slot3")  # HostName defaults to the section name
    assert s3.store_type == "kpartx" and s3.partition == 1 and s3.memory == 131072
    assert s3.vmimages == "/server/vmstore/images"


def test_legacy_obsolete_keys_warn_once_each(caplog):
    caplog.set_level(logging.WARNING)
    cfg = config.parse(LEGACY, "/etc/legacy.cfg")
    warned = [w for w in cfg.warnings if "obsolete" in w]
    assert any("[VmImageManager] vmconfdir" in w for w in warned)
    assert any("[VmImageManager] xenconftemplate" in w for w in warned)
    assert any("[vm002.yokel.org] ip" in w for w in warned)
    assert len(warned) == 3
    assert all(w.startswith("/etc/legacy.cfg: ") for w in warned)


def test_unknown_keys_and_sections_warn_with_file_section_key():
    cfg = config.parse("""\
[vmim.local]
frobnicate = 1
[vmim.default]
bridge = "br0"
[vmim.vm.a]
HostName = "a"
root = "/dev/vg/a"
colour = "blue"
""", "/c.cfg")
    assert "/c.cfg: [vmim.local] frobnicate: unknown key ignored" in cfg.warnings
    assert "/c.cfg: [vmim.vm.a] colour: unknown key ignored" in cfg.warnings
    assert any(w.startswith("/c.cfg: [vmim.default]:") and "not used" in w for w in cfg.warnings)
    assert cfg.slot("a").root == "/dev/vg/a"


def test_a_misspelt_key_names_the_key_it_resembles():
    cfg = config.parse("""\
[vmim.local]
vmimagse = "/srv/images"
[vmim.vm.a]
HostName = "a"
HostDsik = "/srv/a.img"
root = "/dev/vg/a"
""", "/c.cfg")
    assert "/c.cfg: [vmim.vm.a] hostdsik: unknown key ignored; did you mean HostDisk?" \
        in cfg.warnings
    assert "/c.cfg: [vmim.local] vmimagse: unknown key ignored; did you mean vmimages?" \
        in cfg.warnings


def test_store_type_derivation():
    cfg = config.parse("""\
[vmim.vm.1]
HostName = "k"
HostDisk = "/d/k.img"
partition = 1
[vmim.vm.2]
HostName = "p"
HostDisk = "/d/p.img"
[vmim.vm.3]
HostName = "l"
LvmVolumeGroup = "vg0"
[vmim.vm.4]
HostName = "explicit"
store_type = "QCOW2"
HostDisk = "/d/x.qcow2"
""")
    types = {s.name: s.store_type for s in cfg.slots}
    assert types == {"k": "kpartx", "p": "partition", "l": "lvm", "explicit": "qcow2"}
    assert cfg.slot("l").disk == "/dev/vg0/l"


def test_store_type_partition_with_a_partition_number_is_a_config_error(write_config):
    """store_type "partition" takes HostDisk as the filesystem itself: with a partition number
    beside it (say store_type uncommented from the template, or set in [vmim.local] for every
    slot), the number was ignored without a word and the partition table mounted as a
    filesystem. A root beside it is the filesystem: there the number names nothing."""
    path = write_config("""\
[vmim.local]
store_type = "partition"
[vmim.vm.web1]
HostName = "web1"
HostDisk = "/d/web1.img"
partition = 1
[vmim.vm.raw]
HostName = "raw"
HostDisk = "/d/raw.img"
""")
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert len(exc.value.problems) == 1, exc.value.problems
    problem = exc.value.problems[0]
    assert "[vmim.vm.web1] partition" in problem and 'store_type "partition"' in problem
    assert "kpartx" in problem and exc.value.exit_code == 3


def test_every_error_is_reported_at_once_with_file_section_key(write_config):
    path = write_config("""\
[vmim.local]
vmemulator = ["not", "a", "string"]
mount = "relative/path"
[vmim.vm.a]
HostName = "a"
HostDisk = "/d/a.img"
partition = "1"
[vmim.vm.b]
HostDisk = "/d/b.img"
[vmim.vm.c]
HostName = "a"
root = "/d/c.img"
memory = 12.5
store_type = "zfs"
mac = 5
[vmim.vm.d]
HostName = "d"
HostDisk = "/d/a.img"
partition = 0
timeout = "soon"
sourceimage = "perhaps"
""")
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    problems = exc.value.problems
    expected = [
        "[vmim.local] vmemulator: expected a string",
        "[vmim.local] mount: expected an absolute path",
        "[vmim.vm.a] partition: expected an integer, got \"1\"",
        "[vmim.vm.b] HostName: is required",
        "[vmim.vm.c] memory: expected an integer",
        "[vmim.vm.c] store_type: expected one of partition, kpartx, lvm, qcow2",
        "[vmim.vm.c] mac: expected a list of strings",
        "[vmim.vm.d] partition: must be at least 1",
        "[vmim.vm.d] timeout: expected an integer",
        "[vmim.vm.d] sourceimage: expected a boolean",
    ]  # (a HostName or disk of two slots is a warning: test_two_slots_on_one_name_or_disk)
    for e in expected:
        assert any(p.startswith(f"{path}: ") and e in p for p in problems), (e, problems)
    assert len(problems) == len(expected), problems
    assert exc.value.exit_code == 3


def test_malformed_ini_is_a_config_error():
    with pytest.raises(ConfigError) as exc:
        config.parse("[vmim.local\nvmemulator = 1\n", "/bad.cfg")
    assert "/bad.cfg: malformed INI" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config.parse("HostName = x\n", "/nosection.cfg")
    assert "malformed INI" in str(exc.value)


def test_a_file_that_is_not_a_vmim_config():
    with pytest.raises(ConfigError) as exc:
        config.parse("[mysqld]\nport = 3306\n", "/etc/my.cnf")
    assert "not a vmimagemanager configuration" in str(exc.value)


def test_bad_interpolation_names_the_key():
    with pytest.raises(ConfigError) as exc:
        config.parse('[vmim.vm.a]\nHostName = "a"\ncmdline = "console=ttyS0 100%"\n', "/i.cfg")
    assert "/i.cfg: [vmim.vm.a] cmdline: bad %-interpolation" in str(exc.value)


def test_interpolation_and_default_section_work_as_in_the_original():
    cfg = config.parse("""\
[DEFAULT]
base = /srv/vm
[vmim.vm.a]
HostName = "a"
HostDisk = %(base)s/a.img
partition = 1
""")
    assert cfg.slot("a").hostdisk == "/srv/vm/a.img"


def test_shared_disk_with_differing_spelling_is_detected():
    cfg = config.parse("""\
[vmim.vm.a]
HostName = "a"
root = "/d//x.img"
[vmim.vm.b]
HostName = "b"
HostDisk = "/d/./x.img"
""", "/s.cfg")
    assert any("is also a disk of slot 'a'" in w for w in cfg.warnings), cfg.warnings
    assert "two slots cannot share a disk" in (cfg.slot("b").conflict or "")
    assert "two slots cannot share a disk" in (cfg.slot("a").conflict or "")


def test_two_slots_on_one_name_or_disk_are_warned_and_refused_the_others_work(vmim, tmp_path):
    """The original's example config (d430) has two sections of one HostName and disk, a
    copy-and-paste slip 0.3 merged silently: it loads with a warning, the slot is refused when
    acted on (exit 3), the config's other slots work."""
    for n in "abc":
        (tmp_path / f"{n}.img").write_bytes(b"")
    path = tmp_path / "c.cfg"
    path.write_text(f"""\
[VmImageManager]
vmemulator = test:///default
[usbvm002]
vm_slot_enabled = on
HostName = usbvm001
root = {tmp_path}/a.img
[usbvm001]
vm_slot_enabled = on
HostName = usbvm001
root = {tmp_path}/a.img
[other]
vm_slot_enabled = on
root = {tmp_path}/c.img
""")
    cfg = config.load(str(path))
    assert any("[usbvm001] HostName: 'usbvm001' is also the HostName of [usbvm002]" in w
               for w in cfg.warnings), cfg.warnings
    assert cfg.slot_names == ["usbvm001", "other"]
    r = vmim("--config", str(path), "-b", "usbvm001", "--mount", "--dry-run")
    assert r.code == 3, r
    assert "is also the HostName of [usbvm002]" in r.out + r.err
    assert vmim("--config", str(path), "-l").code == 0
    assert vmim("--config", str(path), "-b", "other", "--mount", "--dry-run").code == 0


def test_lookup_order_cli_then_env_then_default(write_config, monkeypatch):
    a = write_config('[vmim.vm.a]\nHostName = "from-cli"\n')
    b = write_config('[vmim.vm.a]\nHostName = "from-env"\n')
    assert config.find_config_path(a, {"VMIM_CFG": b}) == a
    assert config.find_config_path(None, {"VMIM_CFG": b}) == b
    with pytest.raises(ConfigError) as exc:
        config.find_config_path(None, {})
    assert config.DEFAULT_CONFIG_PATH in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config.find_config_path(None, {"VMIM_CFG": "/nonexistent/env.cfg"})
    assert "/nonexistent/env.cfg" in str(exc.value) and "$VMIM_CFG" in str(exc.value)


def test_print_config_round_trips_legacy_into_current():
    legacy = config.parse(LEGACY, "/etc/legacy.cfg")
    text = config.render_config(legacy)
    again = config.parse(text, "/printed.cfg")
    assert again.format == "current"
    assert again.uri == legacy.uri
    strip = ("section",)
    for a, b in zip(legacy.slots, again.slots):
        da = {k: v for k, v in dataclasses.asdict(a).items() if k not in strip}
        db = {k: v for k, v in dataclasses.asdict(b).items() if k not in strip}
        assert da == db
    assert len(again.slots) == len(legacy.slots)


def test_key_table_matches_the_slot_dataclass():
    slot_fields = {f.name for f in dataclasses.fields(Slot)}
    slot_keys = {k.attr for k in KEYS if k.scope == "slot"}
    assert slot_keys <= slot_fields
    assert slot_fields - slot_keys == {"section", "conflict"}
    # every slot key's default is the dataclass default
    defaults = {f.name: f.default for f in dataclasses.fields(Slot)}
    for k in KEYS:
        if k.scope == "slot" and k.attr not in ("name", "store_type", "mount"):
            assert defaults[k.attr] == k.default, k.attr


@pytest.mark.parametrize("rel", ["docs/config.md", "vmimagemanager.cfg.template",
                                 "docs/vmimagemanager.1", "completions/vmimagemanager"])
def test_generated_files_are_up_to_date(rel):
    from vmim.gendocs import GENERATED

    if rel in ("docs/vmimagemanager.1", "completions/vmimagemanager"):
        for generator in ("argparse_manpage", "shtab"):  # pinned in pyproject.toml [test]
            pytest.importorskip(generator, reason=f"{generator} is not installed: pip install -e '.[test]'")

    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        assert fh.read() == GENERATED[rel](), f"{rel} is stale: run 'make docs'"


def test_template_names_every_key_and_is_a_valid_config():
    from vmim import gendocs

    text = gendocs.render_template()
    for k in KEYS:
        assert f"#{k.ini} = " in text, k.ini
    cfg = config.parse(text, "template")
    assert cfg.slot_names == []  # a fresh install has no active slot
    assert cfg.warnings == ()
    # its example slots work once their '#' is removed
    head, tail = text.split("# Every slot key", 1)
    start = head.index("#[vmim.vm.1]")
    examples = "\n".join(line[1:] if line.startswith(("#[", "#H", "#p", "#r")) else line
                         for line in head[start:].splitlines())
    enabled = head[:start] + examples + "\n# Every slot key" + tail
    assert config.parse(enabled, "template").slot_names == ["web1", "build2"]


def test_a_duplicate_section_or_key_names_both_places():
    with pytest.raises(ConfigError) as exc:
        config.parse("""\
[vmim.vm.a]
HostName = "a"
root = "/d/a.img"
[vmim.vm.b]
HostName = "b"
root = "/d/b.img"
ROOT = "/d/b2.img"
[vmim.vm.a]
HostName = "a2"
""", "/dup.cfg")
    problems = exc.value.problems
    assert exc.value.exit_code == 3
    assert any(p.startswith("/dup.cfg: [vmim.vm.a]") and "lines 1 and 8" in p
               for p in problems), problems
    assert any(p.startswith("/dup.cfg: [vmim.vm.b] root") and "lines 6 and 7" in p
               for p in problems), problems
    assert len(problems) == 2, problems


@pytest.mark.parametrize("hostname", ["../../x", "a/b", "/abs", "..", "."])
def test_a_hostname_that_is_not_a_plain_name_is_refused(hostname):
    with pytest.raises(ConfigError) as exc:
        config.parse(f'[vmim.vm.a]\nHostName = "{hostname}"\nroot = "/d/a.img"\n', "/h.cfg")
    assert exc.value.exit_code == 3
    assert "/h.cfg: [vmim.vm.a] HostName" in str(exc.value)


def test_a_legacy_section_name_used_as_hostname_is_checked_too():
    with pytest.raises(ConfigError) as exc:
        config.parse("[VmImageManager]\n[..]\nvm_slot_enabled = on\nroot = /d/a.img\n", "/l.cfg")
    assert "/l.cfg: [..] HostName" in str(exc.value)


def test_two_slots_with_one_mount_point_or_one_inside_another_are_warned():
    cfg = config.parse("""\
[vmim.vm.a]
HostName = "a"
root = "/d/a.img"
mount = "/mnt/x"
[vmim.vm.b]
HostName = "b"
root = "/d/b.img"
mount = "/mnt/x/"
[vmim.vm.c]
HostName = "c"
root = "/d/c.img"
mount = "/mnt/x/c"
""", "/m.cfg")
    warnings = cfg.warnings
    assert any(w.startswith("/m.cfg: [vmim.vm.b] mount") and "'a'" in w for w in warnings), warnings
    assert any(w.startswith("/m.cfg: [vmim.vm.c] mount") and "lies inside" in w
               for w in warnings), warnings
    assert all(cfg.slot(n).conflict for n in "abc")
    # derived mount points (prefix + HostName) are different for different names
    cfg = config.parse('[vmim.vm.a]\nHostName = "a"\nroot = "/d/a.img"\n'
                       '[vmim.vm.b]\nHostName = "ab"\nroot = "/d/b.img"\n')
    assert len(cfg.slots) == 2


def test_a_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.find_config_path(str(tmp_path), {})
    assert exc.value.exit_code == 3
    assert "is a directory" in str(exc.value) and "not found" not in str(exc.value)


def test_two_slots_sharing_a_mount_point_are_warned_and_only_they_are_refused(vmim, tmp_path):
    """Configs of 0.3 have them: the config loads with a warning naming both; the two slots
    are refused (exit 3, naming both) when acted on, the others work."""
    text = """\
[vmim.local]
vmemulator = "test:///default"
[vmim.vm.a]
HostName = "a"
root = "{d}/a.img"
mount = "/mnt/shared"
[vmim.vm.b]
HostName = "b"
root = "{d}/b.img"
mount = "/mnt/shared"
[vmim.vm.c]
HostName = "c"
root = "{d}/c.img"
"""
    for name in "abc":
        (tmp_path / f"{name}.img").write_bytes(b"")
    cfg = config.parse(text.format(d=tmp_path), "/c.cfg")
    assert any("[vmim.vm.b] mount: '/mnt/shared' is also the mount point of slot 'a'" in w
               for w in cfg.warnings)
    for name in ("a", "b"):
        assert "is also the mount point of slot 'a'" in (cfg.slot(name).conflict or "")
    assert cfg.slot("c").conflict is None
    path = tmp_path / "c.cfg"
    path.write_text(text.format(d=tmp_path))
    r = vmim("--config", str(path), "-b", "b", "--mount", "--dry-run")
    assert r.code == 3, r
    assert "[vmim.vm.b] mount '/mnt/shared' is also the mount point of slot 'a'" in r.out + r.err
    r = vmim("--config", str(path), "-b", "c", "--mount", "--dry-run")
    assert r.code == 0, r

def test_an_entry_written_twice_in_a_section_that_is_not_used_is_a_warning():
    """0.2 configs list hosts in [AvailalableHosts], some twice: nothing reads that section, so
    the duplicate is a warning; in a slot section it stays an error."""
    cfg = config.parse("""\
[VmImageManager]
vmimages = /srv/images
[AvailalableHosts]
h1 = yes
h1 = yes
[web1]
vm_slot_enabled = yes
root = /dev/vg/web1
""", "/legacy.cfg")
    assert any(w.startswith("/legacy.cfg: [AvailalableHosts] h1: written twice") and
               "not used" in w for w in cfg.warnings), cfg.warnings
    assert cfg.slot("web1").root == "/dev/vg/web1"
    with pytest.raises(ConfigError) as exc:
        config.parse("""\
[VmImageManager]
vmimages = /srv/images
[web1]
vm_slot_enabled = yes
root = /dev/vg/web1
root = /dev/vg/other
""", "/legacy.cfg")
    assert any("[web1] root: written twice" in p for p in exc.value.problems)


def test_an_unknown_key_is_warned_once_per_run(vmim, tmp_path):
    path = tmp_path / "c.cfg"
    path.write_text(f'[vmim.local]\nvmimages = "{tmp_path}"\n[vmim.vm.a]\nHostName = "a"\n'
                    f'HostDsik = "/srv/a.img"\nroot = "{tmp_path}/a.img"\n')
    r = vmim("--config", str(path), "-L")
    assert r.code == 0, r
    assert r.err.count("hostdsik: unknown key ignored; did you mean HostDisk?") == 1, r.err


def test_disksize_is_whole_mib_and_any_free_is_no_slot_name():
    from vmim.config import parse_size

    assert parse_size("64M") == 64 << 20
    assert parse_size("1.0001G") % (1 << 20) == 0 and parse_size("1.0001G") > 1 << 30
    assert parse_size(True) is None and parse_size("lots") is None
    with pytest.raises(ConfigError) as exc:
        config.parse('[vmim.vm.a]\nHostName = "any-free"\nroot = "/d/a.img"\n', "/a.cfg")
    assert "the word -b uses to claim a free slot" in str(exc.value)


def test_a_key_of_vmim_local_in_a_slot_section_says_where_it_belongs():
    cfg = config.parse('[vmim.vm.a]\nHostName = "a"\nroot = "/d/a.img"\n'
                       'vmemulator = "qemu:///system"\nlockdir = "/run/x"\n', "/c.cfg")
    assert "/c.cfg: [vmim.vm.a] vmemulator: is a key of [vmim.local], not of a slot; " \
        "ignored here" in cfg.warnings, cfg.warnings
    assert "/c.cfg: [vmim.vm.a] lockdir: is a key of [vmim.local], not of a slot; " \
        "ignored here" in cfg.warnings, cfg.warnings


@pytest.mark.parametrize("value", ["/d/a\\u0001b.img", "/d/a\\u001b[2Jb.img", "/d/a\\nb.img",
                                   "/d/a\\u202eb.img", "/d/a\\tb.img"])
def test_a_control_character_in_a_config_value_is_a_config_error(tmp_path, value):
    """It would end up in a libvirt definition (lxml refuses it: an internal error), a log
    line or a command's argument: refused where it is read, exit 3, and shown escaped."""
    path = tmp_path / "c.cfg"
    path.write_text(f'[vmim.vm.a]\nHostName = "a"\nHostDisk = "{value}"\npartition = 1\n')
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert exc.value.exit_code == 3
    assert any("hostdisk: holds a control character" in p.lower() for p in exc.value.problems), \
        exc.value.problems
    assert not any(c in str(exc.value) for c in "\x01\x1b\u202e\t")


def test_a_control_character_in_a_list_value_is_a_config_error(tmp_path):
    path = tmp_path / "c.cfg"
    path.write_text('[vmim.vm.a]\nHostName = "a"\nHostDisk = "/d/a.img"\npartition = 1\n'
                    'mac = ["52:54:00:00:00:01", "aa:bb\\u0001"]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert exc.value.exit_code == 3
    assert any("mac: holds a control character" in p for p in exc.value.problems), \
        exc.value.problems
