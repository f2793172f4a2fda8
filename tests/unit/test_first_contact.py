"""What a new user meets first: a missing config, libvirt out of reach, an unknown box,
--connect. libvirt's own test driver (test:///default, no daemon) and a unix socket the
test makes stand in for a libvirtd where one is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile

import pytest

from tests.conftest import as_user
from vmim import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def slots_cfg(write_config, tmp_path):
    """One slot, web1; vmemulator points at a test-driver file that does not exist."""
    return write_config(f"""\
        [vmim.local]
        vmemulator = "test://{tmp_path}/no-such-host.xml"
        lockdir = "{tmp_path}/locks"
        statedir = "{tmp_path}/state"
        [vmim.vm.1]
        HostName = "web1"
        root = "{tmp_path}/web1.img"
        """)


def test_missing_config_names_the_template_and_where_to_copy_it(vmim, tmp_path):
    wanted = tmp_path / "site.cfg"
    r = vmim("-l", "--config", str(wanted))
    assert r.code == 3, r
    m = re.search(r"copy the template (\S+) there and edit it", r.err)
    assert m, r.err
    assert m.group(1).endswith("vmimagemanager.cfg.template") and os.path.isfile(m.group(1))
    assert f"'{wanted}'" in r.err and "--config or $VMIM_CFG" in r.err


def test_missing_default_config_names_the_default_path(vmim, monkeypatch):
    if os.path.exists(config.DEFAULT_CONFIG_PATH):
        pytest.skip(f"{config.DEFAULT_CONFIG_PATH} exists on this machine")
    monkeypatch.delenv("VMIM_CFG", raising=False)
    r = vmim("-l")
    assert r.code == 3, r
    assert (f"configuration file '{config.DEFAULT_CONFIG_PATH}' (from the default path) was not "
            "found; copy the template ") in r.err


def test_the_named_template_is_the_shipped_one():
    path = config.template_path()
    with open(path) as fh, open(os.path.join(ROOT, "vmimagemanager.cfg.template")) as src:
        assert fh.read() == src.read()


def test_connect_overrides_vmemulator(vmim, slots_cfg, tmp_path):
    r = vmim("--config", slots_cfg, "-l")
    assert r.code == 7, r
    assert f"could not connect to libvirt at 'test://{tmp_path}/no-such-host.xml'" in r.err
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-l")
    assert r.code == 0, r
    rows = {line.split()[0]: line.split()[1:3] for line in r.out.splitlines()[1:]}
    assert rows["web1"][0] == "yes"  # in the config
    assert rows["test"] == ["no", "running"]  # the test driver's domain


def test_unknown_box_names_the_config_and_the_libvirt_uri(vmim, slots_cfg):
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "nosuch", "--print-xml")
    assert r.code == 4, r
    assert (f"unknown box 'nosuch': no slot in {slots_cfg} and no domain in libvirt at "
            "test:///default; known boxes: test, web1") in r.err


def test_libvirt_domain_without_a_slot_is_named_as_such(vmim, slots_cfg):
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "test", "--print-xml")
    assert r.code == 4, r
    assert f"box 'test' is a libvirt domain with no slot in {slots_cfg}" in r.err


# ------------------------------------------------------------ a user libvirt turns away


@pytest.fixture
def public_dir():
    """A directory 'nobody' can read (pytest's tmp_path is root's only)."""
    path = tempfile.mkdtemp(prefix="vmim-test-first-contact-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _cfg(directory, uri):
    path = os.path.join(directory, "vmim.cfg")
    with open(path, "w") as fh:
        fh.write(f'[vmim.local]\nvmemulator = "{uri}"\nlockdir = "{directory}/locks"\n')
    os.chmod(path, 0o644)
    return path


def test_non_root_refused_by_libvirt_is_told_root_or_the_libvirt_group(public_dir):
    # A libvirtd socket only root and the libvirt group may open, as Debian's is.
    sock_path = os.path.join(public_dir, "libvirt-sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(sock_path)
        sock.listen(1)
        os.chmod(sock_path, 0o000 if os.geteuid() != 0 else 0o660)
        uri = f"qemu+unix:///system?socket={sock_path}"
        res = as_user([sys.executable, "-m", "vmim", "--config", _cfg(public_dir, uri), "-l"],
                       public_dir)
    assert res.returncode == 7, res
    assert "Permission denied" in res.stderr
    assert "run vmimagemanager as root, or as a member of the 'libvirt' group" in res.stderr
    assert "is libvirtd running" not in res.stderr


def test_non_root_without_a_daemon_is_told_to_start_libvirtd(public_dir):
    uri = f"qemu+unix:///system?socket={public_dir}/absent-sock"
    res = as_user([sys.executable, "-m", "vmim", "--config", _cfg(public_dir, uri), "-l"],
                   public_dir)
    assert res.returncode == 7, res
    assert "is libvirtd running?" in res.stderr and "--connect URI" in res.stderr


def test_a_comment_after_a_value_is_an_error_that_says_where_comments_go(vmim, write_config,
                                                                          tmp_path):
    """`kernel = "/srv/vmlinuz"   # a note` (INI files elsewhere allow it) was read as the path
    '"/srv/vmlinuz"   # a note' ("expected an absolute path"), and a string key such as
    cmdline kept the quotes and the note without a word."""
    path = write_config(f"""\
        [vmim.local]
        vmimages = "{tmp_path}"          # the image store
        [vmim.vm.1]
        HostName = "web1"  ; the domain
        root = "{tmp_path}/web1.img"
        cmdline = "console=ttyS0 root=/dev/vda1"
        """)
    r = vmim("--config", path, "-l")
    assert r.code == 3, r
    assert ('[vmim.local] vmimages: a comment after the value ("# the image store"): the INI '
            'format takes it as part of the value; put the comment on a line of its own') \
        in r.err, r.err
    assert "hostname" not in r.err, r.err  # ' ; ...' after a value: dropped, as 0.3 did
    assert "cmdline" not in r.err, r.err  # '#' and ';' inside a quoted value are no comment


def test_a_semicolon_comment_after_a_value_is_dropped_as_the_old_tool_did():
    """vmimagemanager 0.3 read its config with Python 2's SafeConfigParser, which cut a value
    at ' ;': configs written for it keep working."""
    cfg = config.parse('[vmim.vm.1]\nHostName = "web1"  ; the domain\n'
                       'root = "/d/web1.img"\npartition = 2 ; the root\n',
                       "/c.cfg")
    slot = cfg.slot("web1")
    assert slot is not None and slot.partition == 2


def test_a_hash_inside_a_value_is_no_comment():
    cfg = config.parse('[vmim.vm.1]\nHostName = "web1"\nroot = "/d/web1.img"\n'
                       'cmdline = "console=ttyS0 # not a comment; nor this"\n'
                       'bridge = br0 # a bare value is taken whole\n', "/c.cfg")
    assert cfg.slot("web1").cmdline == "console=ttyS0 # not a comment; nor this"
    assert cfg.slot("web1").bridge == "br0 # a bare value is taken whole"


def test_a_misspelt_box_names_the_box_it_resembles(vmim, slots_cfg):
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "wbe1", "--print-xml")
    assert r.code == 4, r
    assert (f"unknown box 'wbe1': no slot in {slots_cfg} and no domain in libvirt at "
            "test:///default; did you mean web1? known boxes: test, web1") in r.err, r.err


def test_a_failed_box_is_named_once_in_its_error_line(vmim, slots_cfg):
    if os.geteuid() != 0:
        pytest.skip("a user other than root is told first that a restore needs root")
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "web1", "-r", "golden")
    assert r.code == 3, r
    assert ("vmimagemanager: error: box web1: no image store configured: set vmimages in "
            "[vmim.local] or in the slot's section\n") in r.err, r.err


def test_the_dry_run_shuts_down_with_the_timeout_of_the_command_line(vmim, slots_cfg):
    """--timeout S is the run's; the plan of --dry-run said the slot's (180 s) all the same."""
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "test", "-d",
             "--timeout", "7", "--dry-run")
    assert r.code == 0, r
    assert "1. down: ACPI shutdown, forced off after 7 s" in r.out, r.out
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "test", "-d",
             "--dry-run")
    assert "1. down: ACPI shutdown, forced off after 180 s" in r.out, r.out


def test_listing_a_store_that_is_not_configured_says_which_key_to_set(vmim, slots_cfg):
    r = vmim("--config", slots_cfg, "-L")
    assert r.code == 0 and r.out.split() == ["NAME", "FORMAT", "SIZE", "MODIFIED", "(UTC)",
                                            "DIRECTORY", "BASE", "OF"], r
    assert (f"warning: no image store configured in {slots_cfg}: set vmimages in [vmim.local] "
            "(or in a slot's section)") in r.err, r.err
    r = vmim("--config", slots_cfg, "--list-inserts", "--json")
    assert r.code == 0 and json.loads(r.out)["inserts"] == [], r
    assert "no insert store configured" in r.err and "set vminserts" in r.err, r.err


def test_a_disk_action_without_root_says_to_run_as_root(vmim, slots_cfg, monkeypatch):
    from vmim import steps

    monkeypatch.setattr(steps.os, "geteuid", lambda: 1000)
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "web1", "-r", "golden")
    assert r.code == 7, r
    assert ("vmimagemanager: error: restore needs root (mounting and loop devices): run "
            "vmimagemanager as root, with sudo for instance; the lists (-l, -L) work for the "
            "libvirt group") in r.err, r.err


def test_a_format_flag_without_store_is_a_warning_line_like_the_others(vmim, slots_cfg):
    """It was said before logging was set up: a bare line without 'vmimagemanager: warning:'."""
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "test", "-d", "--zstd",
             "--dry-run")
    assert r.code == 0, r
    assert ("vmimagemanager: warning: format option tar.zst has no effect without -s or -e "
            "(restore and insert detect the format)\n") in r.err, r.err
    r = vmim("--config", slots_cfg, "--connect", "test:///default", "-b", "test", "-d", "--zstd",
             "--dry-run", "-qq")
    assert r.err == "", r


def test_store_and_restore_of_one_name_in_one_command_is_a_usage_error(vmim, slots_cfg):
    """The store runs first: it replaced the image (a tar by an rsync tree, say) that the
    restore had proven, the restore then failed and left the slot marked incomplete."""
    r = vmim("--config", slots_cfg, "-b", "web1", "-r", "golden", "-s", "golden")
    assert r.code == 2, r
    assert ("vmimagemanager: error: -s golden and -r golden in one command: the store runs first "
            "and would replace the image that the restore then reads; store under another name, "
            "or give two commands") in r.err, r.err


def test_a_libvirt_uri_given_to_c_says_that_c_is_config_and_uri_is_connect(vmim):
    r = vmim("-c", "qemu:///system", "-l")
    assert r.code == 3, r
    assert ("configuration file 'qemu:///system' (from --config) was not found: -c is --config "
            "here (the 0.2 spelling); for a libvirt URI (virsh's -c) write --connect "
            "qemu:///system") in r.err, r.err


def test_an_image_given_by_its_path_is_told_to_give_its_name(vmim, slots_cfg):
    r = vmim("--config", slots_cfg, "-b", "web1", "-r", "/srv/images/golden")
    assert r.code == 2, r
    assert ("image name '/srv/images/golden' is not allowed: it must not be empty, contain '/' "
            "or start with '.'; images are named as in their store (-L lists them), not by a "
            "path") in r.err, r.err
    r = vmim("--config", slots_cfg, "-b", "web1", "-i", "./certs")
    assert r.code == 2 and "inserts are named as in their store (--list-inserts lists them)" \
        in r.err, r
