"""Command line: flags, validation, exit codes, lists of images and inserts, lazy imports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import table_rows
from vmim import __version__
from vmim.cli import PIPELINE, build_parser, make_request

SIMPLE = """\
[vmim.local]
vmimages = "{images}"
vmextracts = "{inserts}"
[vmim.vm.a]
HostName = "a"
HostDisk = "/d/a.img"
partition = 1
"""


def request(*argv):
    return make_request(build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------ parsing


def test_every_design_flag_parses():
    r = request("-b", "web1", "-b", "web2", "-k", "-d", "--mount", "-e", "logs-{box}:/var/log",
                "-s", "snap-{box}", "-r", "golden", "-i", "certs", "-i", "keys:/root/.ssh",
                "--release", "--redefine", "--swap", "-u", "-l", "-L", "--list-inserts", "-f", "-m",
                "--zstd",
                "--config", "/x.cfg", "-v", "-q", "--json", "--dry-run", "--timeout", "30",
                "--lock-wait", "10", "--core", "2", "--jobs", "3")
    assert r.boxes == ("web1", "web2")
    assert r.actions == PIPELINE
    assert r.lists == ("boxes", "images", "inserts", "free", "locked")
    assert r.store == "snap-{box}" and r.restore == "golden"
    assert [(t.name, t.directory) for t in r.inserts] == [("certs", "/"), ("keys", "/root/.ssh")]
    assert [(t.name, t.directory) for t in r.extracts] == [("logs-{box}", "/var/log")]
    assert r.format == "tar.zst"


@pytest.mark.parametrize("flag,fmt", [("-y", "rsync"), ("--rsync", "rsync"), ("-z", "tgz"),
                                      ("--tgz", "tgz"), ("-w", "cpio.bz2"),
                                      ("--cpio-bzip", "cpio.bz2"), ("--zstd", "tar.zst")])
def test_format_flags(flag, fmt):
    assert request("-b", "a", "-s", "x", flag).format == fmt


def test_pipeline_order_does_not_depend_on_flag_order():
    r = request("-u", "-i", "certs", "-r", "golden", "-b", "a", "-k")
    assert r.actions == ("kill", "restore", "insert", "up")


def test_original_and_legacy_spellings():
    p = build_parser()
    a = p.parse_args(["-c", "/x.cfg", "-C", "4", "--free", "--locked", "-p", "/out.cfg", "--lvm"])
    assert (a.config, a.core, a.list_free, a.list_locked, a.print_config, a.lvm) == \
        ("/x.cfg", 4, True, True, "/out.cfg", True)
    assert p.parse_args(["--cpu", "2"]).core == 2
    assert p.parse_args(["--print-config"]).print_config == "-"


def test_extract_directories_pair_by_position_with_names_lacking_a_dir():
    r = request("-b", "a", "-e", "one", "-e", "two:/srv/two", "-e", "three",
                "--extract-directory", "/d1", "--extract-directory", "/d3")
    assert [(t.name, t.directory) for t in r.extracts] == \
        [("one", "/d1"), ("two", "/srv/two"), ("three", "/d3")]


@pytest.mark.parametrize("argv,words", [
    (["-b", "a", "-e", "logs"], "no directory to extract"),
    (["-b", "a", "-e", "x:/d", "--extract-directory", "/d2"], "has no -e NAME to pair"),
    (["-b", "a", "-s", "x", "-z", "-w"], "not allowed with"),
    (["-r", "golden"], "needs at least one box"),
    (["-b", "a"], "no action given"),
    ([], "nothing to do"),
    (["-b", "a", "-s", "x", "-s", "y"], "more than once"),
    (["-b", "a", "-i", ":/etc"], "NAME is empty"),
    (["-b", "a", "-i", "certs:"], "directory after ':' is empty"),
    (["--jobs", "0", "-l"], "must be at least 1"),
    (["--timeout", "soon", "-l"], "whole number"),
    (["-l", "stray-positional"], "unrecognized arguments"),
    (["--lst-images"], "did you mean --list-images for --lst-images?"),
    (["-L", "--dryrun"], "did you mean --dry-run for --dryrun?"),
    (["--print-xml"], "--print-xml needs -b BOX"),
    (["-b", "a", "-b", "b", "-s", "golden"], "put {box} in the name"),
    (["-b", "a", "-b", "b", "-e", "logs:/var/log"], "put {box} in the name"),
])
def test_usage_errors_exit_2(vmim, argv, words):
    r = vmim(*argv)
    assert r.code == 2, r
    assert words in r.err
    assert r.err.startswith("vmimagemanager: error: ")
    assert r.out == ""


def test_version_and_help(vmim):
    r = vmim("--version")
    assert r.code == 0 and r.out.strip() == f"vmimagemanager {__version__}"
    r = vmim("--help")
    assert r.code == 0
    text = r.out
    for flag in ["-b", "--box", "-k", "--kill", "-d", "--down", "--mount", "-e", "--extract",
                 "--extract-directory", "-s", "--store", "-r", "--restore", "-i", "--insert",
                 "--release", "-u", "--up", "-l", "--list-boxes", "-L", "--list-images",
                 "--list-inserts", "-f", "--list-free", "-m", "--list-locked", "-y", "--rsync",
                 "-z", "--tgz", "-w", "--cpio-bzip", "--zstd", "--config", "-v", "-q",
                 "--log-config", "--json", "--dry-run", "--timeout", "--lock-wait", "--core",
                 "--jobs", "--print-xml", "--disk-image", "--print-config", "--version"]:
        assert f" {flag}" in text, flag


# ------------------------------------------------------------------ config errors through main


def test_missing_config_exits_3_naming_the_path(vmim, tmp_path):
    r = vmim("-L", "--config", str(tmp_path / "nope.cfg"))
    assert r.code == 3
    assert str(tmp_path / "nope.cfg") in r.err


def test_config_from_environment(vmim, write_config, monkeypatch, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.setenv("VMIM_CFG", write_config(SIMPLE.format(images=images, inserts=tmp_path)))
    r = vmim("-L")
    assert r.code == 0, r
    monkeypatch.setenv("VMIM_CFG", str(tmp_path / "missing.cfg"))
    r = vmim("-L")
    assert r.code == 3 and "missing.cfg" in r.err and "$VMIM_CFG" in r.err


def test_malformed_config_names_every_bad_key(vmim, write_config):
    path = write_config("""\
    [vmim.vm.a]
    HostName = "a"
    partition = "two"
    memory = [1]
    [vmim.vm.b]
    root = "/d/b"
    """)
    r = vmim("-L", "--config", path)
    assert r.code == 3
    assert "3 problems" in r.err
    for where in ("[vmim.vm.a] partition", "[vmim.vm.a] memory", "[vmim.vm.b] HostName"):
        assert f"{path}: {where}" in r.err


def test_config_warnings_go_to_stderr_and_quiet_silences_them(vmim, write_config, tmp_path):
    path = write_config(SIMPLE.format(images=tmp_path, inserts=tmp_path) + "obsolete_thing = 1\n")
    r = vmim("-L", "--config", path)
    assert r.code == 0
    assert "[vmim.vm.a] obsolete_thing: unknown key ignored" in r.err
    assert "obsolete_thing" not in r.out
    r = vmim("-L", "-qq", "--config", path)
    assert r.code == 0 and r.err == ""


def test_json_error_document(vmim, tmp_path):
    r = vmim("-L", "--json", "--config", str(tmp_path / "nope.cfg"))
    assert r.code == 3
    doc = json.loads(r.out)
    assert doc["exit_code"] == 3
    assert doc["error"]["type"] == "ConfigError"
    assert "nope.cfg" in doc["error"]["message"]


def test_log_config_file_missing_is_a_usage_error(vmim, tmp_path):
    r = vmim("-L", "--log-config", str(tmp_path / "nolog.conf"))
    assert r.code == 2 and "nolog.conf" in r.err


# ------------------------------------------------------------------ print-config


def test_print_config_to_stdout_and_to_a_file(vmim, write_config, tmp_path):
    legacy = write_config("""\
    [VmImageManager]
    vmimages = /srv/images
    [slot1]
    vm_slot_enabled = yes
    HostDisk = /srv/disks/slot1.img
    partition = 1
    """)
    r = vmim("--print-config", "--config", legacy)
    assert r.code == 0, r
    assert '[vmim.vm.slot1]' in r.out and 'HostName = "slot1"' in r.out
    out = tmp_path / "converted.cfg"
    r = vmim("--print-config", str(out), "--config", legacy)
    assert r.code == 0 and r.out == ""
    again = vmim("-p", "--config", str(out))
    assert again.code == 0
    # the converted file describes the same slot
    assert 'HostDisk = "/srv/disks/slot1.img"' in again.out and "partition = 1" in again.out


# ------------------------------------------------------------------ image and insert lists


def _make_store(tmp_path):
    images, inserts = tmp_path / "images", tmp_path / "inserts"
    images.mkdir()
    inserts.mkdir()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n" * 100)
    tar = subprocess.run(["tar", "-C", str(tree), "-cf", "-", "."], capture_output=True,
                         check=True).stdout
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-Hnewc", "--quiet"], cwd=tree, input=names,
                          capture_output=True, check=True).stdout

    def compress(argv, data):
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout

    # names that give no hint (or a wrong one)
    (images / "alpha").write_bytes(compress(["gzip", "-c"], tar))
    (images / "beta.tgz").write_bytes(compress(["bzip2", "-c"], cpio))
    (images / "gamma").write_bytes(compress(["zstd", "-q", "-c"], tar))
    shutil.copytree(tree, images / "delta")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "epsilon"), "1G"],
                   check=True)
    (images / "zeta").write_text("not an image\n")
    (images / ".vmim-tmp-debris").write_text("hidden\n")
    (inserts / "certs").write_bytes(compress(["gzip", "-c"], tar))
    shutil.copytree(tree / "etc", inserts / "etc-extract")
    return images, inserts


def test_list_images_names_each_format_by_content(vmim, write_config, tmp_path):
    for tool in ("tar", "cpio", "gzip", "bzip2", "zstd", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make test installs it)")
    images, inserts = _make_store(tmp_path)
    path = write_config(SIMPLE.format(images=images, inserts=inserts))
    r = vmim("-L", "--config", path)
    assert r.code == 0, r
    rows = {row[0]: row for row in table_rows(r.out)}
    assert {n: row[1] for n, row in rows.items()} == {
        "alpha": "tgz", "beta.tgz": "cpio.bz2", "gamma": "tar.zst", "delta": "rsync",
        "epsilon": "qcow2", "zeta": "unknown"}
    assert rows["delta"][2] == "600 B"  # the tree's file sizes summed
    assert all(row[4] == str(images) for row in rows.values())

    r = vmim("-L", "--json", "--config", path)
    doc = json.loads(r.out)
    by_name = {e["name"]: e for e in doc["images"]}
    assert by_name["alpha"]["format"] == "tgz"
    assert by_name["epsilon"]["size"] == os.path.getsize(images / "epsilon")
    assert by_name["delta"]["path"] == str(images / "delta")
    assert doc["exit_code"] == 0

    r = vmim("--list-inserts", "--json", "--config", path)
    assert {e["name"]: e["format"] for e in json.loads(r.out)["inserts"]} == \
        {"certs": "tgz", "etc-extract": "rsync"}


def test_list_images_with_a_missing_store_warns_and_lists_nothing(vmim, write_config, tmp_path):
    path = write_config(SIMPLE.format(images=tmp_path / "absent", inserts=tmp_path))
    r = vmim("-L", "--config", path)
    assert r.code == 0
    assert "absent does not exist" in r.err
    assert table_rows(r.out) == []


def test_names_with_newlines_and_bad_bytes_print_on_one_line(vmim, write_config, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    os.mkdir(os.path.join(bytes(images), b"bad\xffname\nsecond"))
    path = write_config(SIMPLE.format(images=images, inserts=tmp_path))
    r = vmim("-L", "--config", path)
    assert r.code == 0
    rows = table_rows(r.out)
    assert len(rows) == 1 and rows[0][0] == "bad\\xffname\\nsecond"
    doc = json.loads(vmim("-L", "--json", "--config", path).out)
    assert doc["images"][0]["name"].encode("utf-8", "surrogateescape") == b"bad\xffname\nsecond"


# ------------------------------------------------------------------ libvirt unreachable


def test_libvirt_unreachable_exits_7_and_says_how_to_start_it(vmim, write_config, tmp_path):
    path = write_config(f"""\
    [vmim.local]
    vmemulator = "qemu:///system?socket={tmp_path}/no-such-socket"
    [vmim.vm.a]
    HostName = "a"
    root = "/d/a.img"
    """)
    for argv in (["-l"], ["-b", "a", "-d"]):
        r = vmim(*argv, "--config", path)
        assert r.code == 7, r
        assert "could not connect to libvirt" in r.err
        assert "no-such-socket" in r.err
        assert "libvirtd -d" in r.err


# ------------------------------------------------------------------ start-up cost


def test_help_version_and_print_config_do_not_import_heavy_modules(write_config):
    path = write_config(SIMPLE.format(images="/srv/i", inserts="/srv/x"))
    code = (
        "import sys, io\n"
        "from vmim.cli import main\n"
        f"main(['--print-config', '--config', {path!r}], stdout=io.StringIO())\n"
        "main(['--version'])\n"
        "main(['--help'])\n"
        "heavy = sorted(m for m in ('libvirt', 'lxml', 'magic') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "HEAVY="


@pytest.mark.parametrize("argv,words", [
    (["-b", "a", "-r", "golden", "-i", "certs", "--disk-image"], "does not go with -i or -e"),
    (["-b", "a", "-u", "--disk-image"], "goes with -s NAME or -r NAME"),
])
def test_disk_image_goes_with_store_or_restore_only(vmim, argv, words):
    r = vmim(*argv)
    assert r.code == 2 and words in r.err
    assert request("-b", "a", "-r", "golden", "--disk-image").disk_image is True


def test_dry_run_does_not_write_the_printed_config(vmim, write_config, tmp_path):
    path = write_config(SIMPLE.format(images=tmp_path, inserts=tmp_path))
    r = vmim("--print-config", str(tmp_path / "out.cfg"), "--dry-run", "-v", "--config", path)
    assert r.code == 0 and "would write the configuration" in r.err
    assert not (tmp_path / "out.cfg").exists()


def test_log_config_file_is_used(vmim, write_config, tmp_path):
    log_cfg = tmp_path / "logging.conf"
    log_file = tmp_path / "vmim.log"
    log_cfg.write_text(f"""[loggers]
keys=root
[handlers]
keys=file
[formatters]
keys=plain
[logger_root]
level=DEBUG
handlers=file
[handler_file]
class=FileHandler
args=({str(log_file)!r},)
formatter=plain
[formatter_plain]
format=%(levelname)s %(message)s
""")
    path = write_config(SIMPLE.format(images=tmp_path, inserts=tmp_path) + "stray = 1\n")
    import logging

    before = list(logging.getLogger().handlers)
    try:
        r = vmim("-L", "--log-config", str(log_cfg), "--config", path)
    finally:  # fileConfig configured this process's root logger: put it back
        for h in logging.getLogger().handlers:
            if h not in before:
                logging.getLogger().removeHandler(h)
                h.close()
    assert r.code == 0
    assert "WARNING" in log_file.read_text() and "stray: unknown key ignored" in log_file.read_text()


@pytest.fixture
def restore_root_handlers():
    import logging

    before = list(logging.getLogger().handlers)
    yield
    for h in logging.getLogger().handlers:
        if h not in before:
            logging.getLogger().removeHandler(h)
            h.close()


def test_syslog_without_a_socket_warns_once_and_carries_on(vmim, write_config, tmp_path,
                                                           restore_root_handlers):
    path = write_config(SIMPLE.format(images=tmp_path, inserts=tmp_path))
    for _ in range(2):  # every step that logs would have failed again
        r = vmim("-q", "--syslog", "/nonexistent/socket", "--dry-run", "-p",
                 str(tmp_path / "out.cfg"), "-L", "--config", path)
        assert r.code == 0, r
        assert "Traceback" not in r.err and "Logging error" not in r.err, r.err
        lines = r.err.splitlines()
        assert len(lines) == 1 and "syslog" in lines[0] and "/nonexistent/socket" in lines[0], r.err


def test_syslog_gets_the_steps_even_when_stderr_is_quiet(vmim, write_config, tmp_path,
                                                         restore_root_handlers):
    import socket

    path = write_config(SIMPLE.format(images=tmp_path, inserts=tmp_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "log"))
        r = vmim("-q", "--syslog", str(tmp_path / "log"), "--dry-run", "-p",
                 str(tmp_path / "out.cfg"), "--config", path)
        assert r.code == 0 and r.err == "", r
        server.setblocking(False)
        received = []
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(server.recv(4096))
        assert any(b"would write the configuration" in m for m in received), received


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_reader_that_closed_the_pipe_early_is_not_an_error(tmp_path, json_flag):
    """`vmimagemanager -L | head -1`: the reader is gone before the tool writes; it exits
    quietly (no traceback, no error line), with the list's exit code."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(200):
        (images / f"image-{i:03d}").mkdir()
    cfg = tmp_path / "c.cfg"
    cfg.write_text(SIMPLE.format(images=images, inserts=tmp_path))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "vmim", "--config", str(cfg), "-L",
                               *json_flag], stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(w)
    assert proc.stderr == ""
    assert proc.returncode == 0
