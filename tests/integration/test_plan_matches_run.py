"""A dry run exits with the code the real run ends with, from every starting state: the plan is
computed once from one observation, and the run executes exactly it (issue "the plan runs the
box"). Real loop-mounted ext4 slots, real running TCG domains, real locks held by another
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from tests.integration.test_images import run_ok
from vmim.disk import hold


def _hold_locks(lockdir, boxes):
    """Another process holding the slots' locks (as a concurrent command would)."""
    code = ("import sys, time, contextlib\n"
            "from vmim import lock\n"
            "with contextlib.ExitStack() as s:\n"
            f"    for b in {list(boxes)!r}:\n"
            f"        s.enter_context(lock.slot_lock({lockdir!r}, b))\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _golden(rig):
    with tarfile.open(rig.images / "golden", "w:gz") as tf:
        src = rig.root / "golden-src"
        src.mkdir(exist_ok=True)
        (src / "marker").write_text("golden\n")
        tf.add(str(src), arcname=".")
    with tarfile.open(rig.inserts / "certs", "w:gz") as tf:
        tf.add(str(src / "marker"), arcname="etc/cert")


def _start_with_disk(rig, domains, key):
    name = rig.names[key]
    domains.define(name, disk=rig.disk(key), start=True)
    return name


SCENARIOS = ["off", "running", "running --mount", "mounted", "mounted and running",
             "mounted and running -k --release", "locked", "missing image", "missing insert",
             "any-free, none free", "incomplete -u", "missing disk", "missing image store",
             "held by a QEMU libvirt does not know"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dry_run_exit_code_is_the_run_s(vmim, rig, domains, scenario):
    _golden(rig)
    box = rig.names["ext4"]
    argv = ["-b", box, "-r", "golden", "-i", "certs", "--timeout", "1"]
    expected = 0
    holder = None
    try:
        if scenario == "running":
            _start_with_disk(rig, domains, "ext4")
        elif scenario == "running --mount":
            _start_with_disk(rig, domains, "ext4")
            argv, expected = ["-b", box, "--mount"], 4
        elif scenario == "mounted":
            run_ok(vmim, rig, "-b", box, "--mount")
            argv += ["--release"]
        elif scenario.startswith("mounted and running"):
            run_ok(vmim, rig, "-b", box, "--mount")
            # the disk hold makes a start fail; the unsafe state needs a slot whose holder is
            # gone (mounted by a run that was killed, or by an older version)
            hold.stop_holders(rig.disk("ext4"), "test")
            _start_with_disk(rig, domains, "ext4")  # the unsafe state: both may write
            if scenario.endswith("--release"):
                argv = ["-b", box, "-k", "--release"]
            else:
                expected = 4
        elif scenario == "locked":
            holder = _hold_locks(os.path.join(rig.root, "locks"), [box])
            expected = 5
        elif scenario == "missing image":
            argv[argv.index("golden")] = "nothing-like-it"
            expected = 4
        elif scenario == "missing insert":
            argv[argv.index("certs")] = "no-such-insert"
            expected = 4
        elif scenario == "any-free, none free":
            holder = _hold_locks(os.path.join(rig.root, "locks"), list(rig.names.values()))
            argv = ["-b", "any-free", "-r", "golden"]
            expected = 5
        elif scenario == "held by a QEMU libvirt does not know":
            holder = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display",
                                       "none", "-machine", "pc,accel=tcg", "-m", "32", "-drive",
                                       f"file={rig.disk('ext4')},format=raw,if=virtio"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not hold.holders(rig.disk("ext4")) and time.monotonic() < deadline:
                time.sleep(0.1)
            expected = 4
        elif scenario == "incomplete -u":
            state = rig.root / "state"
            state.mkdir(exist_ok=True)
            (state / f"{box}.incomplete").write_text(json.dumps(
                {"box": box, "disk": rig.disk("ext4"), "image": "golden", "started": "then"}))
            argv, expected = ["-b", box, "-u"], 4
        elif scenario == "missing disk":
            os.rename(rig.disk("ext4"), rig.disk("ext4") + ".away")
            argv, expected = ["-b", box, "--mount"], 4
        elif scenario == "missing image store":
            os.rename(rig.images, str(rig.images) + ".away")
            argv, expected = ["-b", box, "-s", "snap"], 4
        dry = vmim(*argv, "--dry-run", "--json", "--config", rig.cfg)
        doc = json.loads(dry.out)
        assert dry.code == expected, dry
        assert doc["exit_code"] == doc["expected_exit_code"] == expected
        real = vmim(*argv, "--config", rig.cfg)
        assert real.code == dry.code, (dry, real)
        if expected:
            plan = next(iter(doc["plan"].values()))
            reason = plan["expected_error"].split(";")[0]
            reason = reason.removeprefix(f"box '{box}': ")  # the error line names the box once
            assert reason in real.err, (reason, real.err)  # the same reason
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for key in rig.names:
            try:
                dom = domains.conn.lookupByName(rig.names[key])
                if dom.isActive():
                    dom.destroy()
            except domains.libvirt.libvirtError:
                pass
        time.sleep(0.1)
        vmim("-b", box, "--release", "--config", rig.cfg)
        for path in (rig.disk("ext4"), str(rig.images)):
            if os.path.exists(path + ".away"):
                os.rename(path + ".away", path)


def test_json_results_list_every_step_run_with_its_own_seconds(vmim, rig, domains):
    _golden(rig)
    box = _start_with_disk(rig, domains, "ext4")
    r = vmim("-b", box, "-r", "golden", "--timeout", "1", "--release", "--json",
             "--config", rig.cfg)
    assert r.code == 0, r
    steps = json.loads(r.out)["results"][0]["steps"]
    assert [(s["step"], s["implicit"]) for s in steps] == [
        ("verify", True), ("down", True), ("mount", True), ("restore", False),
        ("release", False)]
    down = steps[1]
    assert down["seconds"] >= 1.0  # the guest ignored ACPI: forced off after --timeout 1
    assert steps[3]["seconds"] < down["seconds"] + 30 and "timings" in steps[3]
    # the shutdown is not in it; the digest was checked before the shutdown (no wait for it)
    assert set(steps[3]["timings"]) == {"prepare", "clear", "transfer"}


def test_a_fleet_job_whose_lease_expired_stops_before_its_next_step(vmim, rig, tmp_path,
                                                                    monkeypatch):
    """A worker frozen past its heartbeat may have lost the job to another: its run must not
    go on to mount, overwrite or boot anything."""
    from vmim import lease

    path = tmp_path / "lease"
    lease.renew(str(path))
    old = time.time() - 300
    os.utime(path, (old, old))
    monkeypatch.setenv(lease.ENV_LEASE, str(path))
    monkeypatch.setenv(lease.ENV_TTL, "10")
    r = vmim("-b", rig.names["ext4"], "--mount", "--config", rig.cfg)
    assert r.code == 1 and "lease expired" in r.err, r
    assert not os.path.ismount(rig.mnt("ext4"))
    lease.renew(str(path))  # the worker still holds it: the job runs
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--mount")
    run_ok(vmim, rig, "-b", rig.names["ext4"], "--release")


def test_disk_image_store_of_a_disk_that_is_no_file_is_refused_by_the_dry_run_too(
        vmim, rig, write_config, domains):
    name = domains.name("dev")
    cfg = write_config(f"""\
    [vmim.local]
    mount = "{rig.root}/mnt"
    lockdir = "{rig.root}/locks"
    statedir = "{rig.root}/state"
    vmimages = "{rig.images}"
    [vmim.vm.dev]
    HostName = "{name}"
    root = "/dev/null"
    """)
    dry = vmim("-b", name, "--disk-image", "-s", "whole", "--dry-run", "--config", cfg)
    real = vmim("-b", name, "--disk-image", "-s", "whole", "--config", cfg)
    assert dry.code == real.code == 4, (dry, real)
    assert "works on disk image files" in dry.out and "works on disk image files" in real.err
    assert not (rig.images / "whole").exists()


@pytest.mark.parametrize("argv", [["-s", "../escape"], ["-r", "../golden"], ["-i", "../certs"],
                                  ["-e", "../logs:/var/log"], ["-s", ".hidden"]])
def test_a_bad_name_on_a_mounted_slot_is_refused_before_anything_is_touched(vmim, rig, argv):
    """Checks that need no mount run first: the slot the user mounted stays mounted."""
    box = rig.names["ext4"]
    run_ok(vmim, rig, "-b", box, "--mount")
    try:
        (open(os.path.join(rig.mnt("ext4"), "user-file"), "w")).close()
        r = vmim("-b", box, *argv, "--config", rig.cfg)
        assert r.code == 2, r
        assert "is not allowed" in r.err
        assert os.path.ismount(rig.mnt("ext4"))
        assert os.path.exists(os.path.join(rig.mnt("ext4"), "user-file"))
    finally:
        run_ok(vmim, rig, "-b", box, "--release")
