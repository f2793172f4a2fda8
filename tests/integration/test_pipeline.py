"""The whole command: interruption, leftovers of a killed run, several boxes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration import diskimages as di
from vmim import lock
from vmim.disk import loop, mounts


@pytest.fixture(scope="module")
def big_tgz(tmp_path_factory):
    """A tgz that takes a while to unpack (300 MiB that do not compress), made once."""
    where = tmp_path_factory.mktemp("big")
    src = where / "src"
    src.mkdir()
    for i in range(3):
        with open(src / f"blob{i}", "wb") as fh:
            fh.write(os.urandom(100 * 1024 * 1024))
    (src / "marker").write_text("golden\n")
    subprocess.run(["tar", "-C", str(src), "-czf", str(where / "big"), "."], check=True)
    subprocess.run(["rm", "-rf", str(src)], check=True)
    return where / "big"


@pytest.fixture
def pair(tmp_path, write_config, domains, big_tgz):
    """Two ext4 slots and an image store holding `big`, a tgz that takes a while to unpack."""
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    names = [domains.name("a"), domains.name("b")]
    for n in ("a", "b"):
        di.filesystem_image(str(tmp_path / f"{n}.img"), "ext4", 400, f"slot {n}")
    cfg = write_config(f"""\
    [vmim.local]
    mount = "{tmp_path}/mnt"
    lockdir = "{tmp_path}/locks"
    statedir = "{tmp_path}/state"
    vmimages = "{images}"
    [vmim.vm.a]
    HostName = "{names[0]}"
    root = "{tmp_path}/a.img"
    [vmim.vm.b]
    HostName = "{names[1]}"
    root = "{tmp_path}/b.img"
    """)
    shutil.copyfile(big_tgz, images / "big")  # a copy: a test may damage or replace its own
    return tmp_path, cfg, names


def cli(cfg, *argv):
    return [sys.executable, "-m", "vmim", "--config", cfg, *argv]


def wait_until_unpacking(proc, *mnts, timeout=60):
    """Block until every mount point holds a restore's staging directory; fail if the restore
    ends or never gets there (then a signal would not land mid-restore)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if all(m.is_dir() and any(n.startswith(".vmim-restore.") for n in os.listdir(m))
               for m in mnts):
            return
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail("the restore never reached unpacking in every slot")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_restore_cleans_up_and_exits_with_the_signal_code(pair, sig, code, domains):
    root, cfg, names = pair
    proc = subprocess.Popen(cli(cfg, "-b", names[0], "-r", "big", "-u"), stderr=subprocess.PIPE,
                            text=True)
    mnt = root / "mnt" / names[0]
    wait_until_unpacking(proc, mnt)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "incomplete" in err and "the domain was not started" in err
    assert mounts.mounted_at(str(mnt)) is None
    assert loop.loops_backed_by(str(root / "a.img")) == []
    assert lock.holder(str(root / "locks"), names[0]) is None
    assert names[0] not in [d.name() for d in domains.conn.listAllDomains()]


def test_after_sigkill_the_next_run_cleans_up_first(pair, vmim):
    root, cfg, names = pair
    proc = subprocess.Popen(cli(cfg, "-b", names[0], "-r", "big"), stderr=subprocess.DEVNULL)
    mnt = root / "mnt" / names[0]
    wait_until_unpacking(proc, mnt)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mounts.mounted_at(str(mnt)) is not None  # what SIGKILL leaves behind
    r = vmim("-b", names[0], "-r", "big", "--release", "--config", cfg)
    assert r.code == 0, r
    assert mounts.mounted_at(str(mnt)) is None
    assert loop.loops_backed_by(str(root / "a.img")) == []
    assert vmim("-b", names[0], "--mount", "--config", cfg).code == 0
    assert sorted(os.listdir(mnt)) == ["blob0", "blob1", "blob2", "lost+found", "marker"]
    assert vmim("-b", names[0], "--release", "--config", cfg).code == 0


def test_a_command_a_killed_run_left_in_the_slot_is_stopped_and_the_slot_released(pair, vmim):
    # What SIGKILL of vmimagemanager leaves: its tar or rsync, still working in the slot (here a
    # stand-in that would never end), marked with the run that started it, which is gone.
    root, cfg, names = pair
    mnt = root / "mnt" / names[0]
    assert vmim("-b", names[0], "--mount", "--config", cfg).code == 0
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open(f"/proc/{os.getpid()}/stat") as fh:  # any start time: the pid is not running
        start = fh.read().rsplit(")", 1)[1].split()[19]
    left = subprocess.Popen(["sleep", "600"], cwd=mnt,
                            env={**os.environ, "VMIM_OWNER": f"{gone.pid}:{start}"})
    bystander = subprocess.Popen(["sleep", "600"], cwd=root)  # not in the slot: left alone
    try:
        r = vmim("-b", names[0], "--release", "--config", cfg)
        assert r.code == 0, r
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert mounts.mounted_at(str(mnt)) is None
        assert f"pid {left.pid} (sleep, of run {gone.pid})" in r.err
    finally:
        for p in (left, bystander):
            p.kill()
            p.wait()


def test_one_failing_box_does_not_stop_the_other(pair, vmim):
    root, cfg, names = pair
    os.unlink(root / "b.img")
    r = vmim("-b", names[1], "-b", names[0], "--mount", "--json", "--config", cfg)
    assert r.code == 4, r
    doc = json.loads(r.out)
    by_box = {x["box"]: x for x in doc["results"]}
    assert by_box[names[1]]["exit_code"] == 4 and by_box[names[0]]["exit_code"] == 0
    assert mounts.mounted_at(str(root / "mnt" / names[0])) is not None
    assert f"box {names[1]}: " in r.err and "b.img' does not exist" in r.err
    assert vmim("-b", names[0], "--release", "--config", cfg).code == 0


def test_any_free_claims_different_slots_for_concurrent_jobs(pair, vmim):
    root, cfg, names = pair
    procs = [subprocess.Popen(cli(cfg, "-b", "any-free", "-r", "big"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    claimed = sorted(o[0].strip() for o in outs)
    assert claimed == sorted(names)
    # both slots are now mounted (restored, not released): none is free
    r = vmim("-b", "any-free", "--mount", "--config", cfg)
    assert r.code == 5 and "no free slot" in r.err, r
    assert vmim("-f", "--config", cfg).out == ""
    r = vmim("-b", names[0], "-b", names[1], "--release", "--config", cfg)
    assert r.code == 0
    assert f"box {names[0]}: ok" in r.err and f"box {names[1]}: ok" in r.err  # the summary
    doc = json.loads(vmim("-b", "any-free", "--mount", "--json", "--config", cfg).out)
    assert doc["claimed"] in names and doc["results"][0]["box"] == doc["claimed"]
    assert vmim("-b", doc["claimed"], "--release", "--config", cfg).code == 0


def test_json_steps_carry_image_format_and_bytes(pair, vmim):
    root, cfg, names = pair
    r = vmim("-b", names[0], "-r", "big", "--zstd", "-s", "again", "--release", "--json",
             "--config", cfg)
    assert r.code == 0, r
    listed = json.loads(r.out)["results"][0]["steps"]
    # the fixed order, not the flags', implicit steps included and said to be
    assert [(s["step"], s["implicit"]) for s in listed] == [
        ("verify", True), ("mount", True), ("store", False), ("restore", False),
        ("release", False)]
    steps = {s["step"]: s for s in listed}
    assert steps["restore"]["image"] == "big" and steps["restore"]["format"] == "tgz"
    assert steps["restore"]["bytes"] == os.path.getsize(root / "images" / "big")
    assert steps["store"]["format"] == "tar.zst"
    assert steps["store"]["bytes"] == os.path.getsize(root / "images" / "again")
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in steps.values())


def test_dry_run_of_a_full_pipeline_changes_nothing(pair, vmim, domains):
    root, cfg, names = pair
    domains.define(names[0], disk=str(root / "a.img"), start=True)
    before_images = sorted(os.listdir(root / "images"))
    r = vmim("-b", names[0], "-r", "big", "-i", "certs", "-s", "snap", "-u", "--dry-run",
             "--config", cfg)
    assert r.code == 3, r  # no inserts store is configured: the run would end with exit 3
    lines = r.out.splitlines()
    assert lines[0] == f"box {names[0]}:"
    steps = [line.split(":")[0].split(". ")[1] for line in lines[1:] if line.startswith("  ")
             and ". " in line.split(":")[0]]
    assert steps == ["verify (implicit)", "down (implicit)", "mount (implicit)", "store",
                     "restore", "insert", "release (implicit)", "up"]
    assert "image big (tgz)" in r.out
    assert "the run would fail (exit 3)" in r.out and "no insert store configured" in r.out
    assert lines[-1].startswith("(dry run: nothing was changed; the run would exit 3")
    # nothing changed: the domain runs, nothing mounted or mapped, no lock taken, no file written
    assert domains.state(names[0]) == 1
    assert not (root / "mnt").exists()
    assert loop.loops_backed_by(str(root / "a.img")) == []
    assert not (root / "locks").exists()
    assert sorted(os.listdir(root / "images")) == before_images
    doc = json.loads(vmim("-b", names[0], "-r", "big", "-u", "--dry-run", "--json",
                          "--config", cfg).out)
    assert [s["step"] for s in doc["plan"][names[0]]["steps"]] == [
        "verify", "down", "mount", "restore", "release", "up"]
    assert doc["expected_exit_code"] == 0 and doc["exit_code"] == 0
    assert "results" not in doc
    # the real run ends as the dry run said, before touching anything
    r = vmim("-b", names[0], "-r", "big", "-i", "certs", "-s", "snap", "-u", "--config", cfg)
    assert r.code == 3 and "no insert store configured" in r.err, r
    assert domains.state(names[0]) == 1


def test_two_restores_in_parallel_both_succeed(pair, vmim):
    root, cfg, names = pair
    r = vmim("-b", names[0], "-b", names[1], "-r", "big", "--jobs", "2", "--release", "--json",
             "--config", cfg)
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert [x["box"] for x in doc["results"]] == names
    assert all(x["exit_code"] == 0 for x in doc["results"])
    for n in names:
        assert vmim("-b", n, "--mount", "--config", cfg).code == 0
        mp = root / "mnt" / n
        assert (mp / "marker").read_text() == "golden\n"
        assert vmim("-b", n, "--release", "--config", cfg).code == 0


def test_sigterm_during_parallel_restores_cleans_up_every_box(pair, domains):
    root, cfg, names = pair
    proc = subprocess.Popen(cli(cfg, "-b", names[0], "-b", names[1], "-r", "big", "-u",
                                "--jobs", "2"), stderr=subprocess.PIPE, text=True)
    wait_until_unpacking(proc, *(root / "mnt" / n for n in names))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    for n, disk in zip(names, ("a.img", "b.img")):
        assert mounts.mounted_at(str(root / "mnt" / n)) is None
        assert loop.loops_backed_by(str(root / disk)) == []
        assert lock.holder(str(root / "locks"), n) is None
    # A box whose restore ended in the moment before the signal came has defined and started
    # its domain (-u): that is its result, not a leftover (igzip made it happen now and then,
    # the 1 MiB reads of 2026-12-08 more often): stopped and undefined here, so that the leak
    # check sees what the signal left only.
    for n in names:
        try:
            dom = domains.conn.lookupByName(n)
        except domains.libvirt.libvirtError:
            continue  # never defined: the run did not get as far as starting it
        if dom.isActive():
            dom.destroy()
        try:
            dom.undefine()
        except domains.libvirt.libvirtError:
            pass  # gone already


def _run_on_a_terminal(argv):
    """Run argv with stderr on a pseudo-terminal; return (exit code, what it wrote there)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_none_in_cron(pair):
    root, cfg, names = pair
    code, tty = _run_on_a_terminal(cli(cfg, "-b", names[0], "-r", "big", "--release"))
    assert code == 0, tty
    assert f"{names[0]} restore: " in tty and " of " in tty and "/s, " in tty and "left" in tty
    res = subprocess.run(cli(cfg, "-b", names[0], "-r", "big", "--release"), capture_output=True,
                         text=True)
    assert res.returncode == 0
    assert "\r" not in res.stderr and " left" not in res.stderr  # no progress off a terminal
    assert f"box {names[0]}: restore: big (tgz)" in res.stderr  # one concise line per step
    res = subprocess.run(cli(cfg, "-q", "-b", names[0], "-r", "big", "--release"),
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == ""  # -q: nothing at all for cron on success


def test_syslog_records_the_steps_while_stderr_stays_quiet(pair, tmp_path):
    import socket

    root, cfg, names = pair
    address = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    try:
        res = subprocess.run(cli(cfg, "-q", "-b", names[0], "--mount", "--release", "--syslog",
                                 address), capture_output=True, text=True)
        assert res.returncode == 0 and res.stderr == ""
        messages = []
        while True:
            try:
                messages.append(sock.recv(65536).decode())
            except OSError:
                break
            if any("release" in m for m in messages):
                break
    finally:
        sock.close()
    assert any(f"box {names[0]}: mount: mounted" in m and "vmimagemanager[" in m for m in messages)
    assert any(f"box {names[0]}: release: unmounted" in m for m in messages)


def test_sigterm_stops_the_boxes_that_have_not_started(pair):
    root, cfg, names = pair
    proc = subprocess.Popen(cli(cfg, "-b", names[0], "-b", names[1], "-r", "big"),
                            stderr=subprocess.PIPE, text=True)
    wait_until_unpacking(proc, root / "mnt" / names[0])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not (root / "mnt" / names[1]).exists()  # the second box was never mounted
    assert f"box {names[1]}" not in err
