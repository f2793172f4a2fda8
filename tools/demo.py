"""`make demo`: a demo slot under ./demo, and the main job done with vmimagemanager.

Builds a disk image with a partition table holding a tiny guest's root filesystem, a config
for it (the guest is Debian's cloud kernel by direct kernel boot with a busybox initramfs that
reports the root filesystem's /marker on its serial console), then runs, printing each command:
define and boot the slot through libvirt.xsl, store it as `golden` (tar.zst), change a file in
the guest, restore `golden` with -u, and show the console line proving the restored image
booted. Re-runnable. `make demo-clean` (this script with --clean) removes everything it made.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import guest as guest_mod  # noqa: E402  (the same guest the e2e tests boot)

DEMO = os.path.abspath(os.environ.get("VMIM_DEMO_DIR", os.path.join(ROOT, "demo")))
NAME = os.environ.get("VMIM_DEMO_BOX", "vmim-demo")
CFG = os.path.join(DEMO, "vmimagemanager.cfg")
CONSOLE = os.path.join(DEMO, "console.log")
TOOL = os.path.join(os.path.dirname(sys.executable), "vmimagemanager")
ORIGINAL = "original demo image"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*argv: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
    if show:
        print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return subprocess.run(argv, check=check, text=True)


def vmim(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    shown = ["vmimagemanager", "--config", os.path.relpath(CFG), *argv]
    print("$ " + " ".join(shlex.quote(a) for a in shown), flush=True)
    return subprocess.run([TOOL, "--config", CFG, *argv], check=check, text=True)


def quiet(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_disk(path: str) -> None:
    """64 MiB, MBR, partition 1 = ext4 holding the guest's root filesystem."""
    with open(path + ".tmp", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    subprocess.run(["sfdisk", "-q", path + ".tmp"], input="label: dos\n,,L\n", text=True,
                   check=True)
    dev = quiet("losetup", "--find", "--show", "--offset", str(1024 * 1024), path + ".tmp").strip()
    mnt = os.path.join(DEMO, ".setup-mnt")
    os.makedirs(mnt, exist_ok=True)
    try:
        quiet("mkfs.ext4", "-q", "-L", "demo-root", dev)
        quiet("mount", dev, mnt)
        try:
            os.makedirs(os.path.join(mnt, "etc"))
            with open(os.path.join(mnt, "etc", "hostname"), "w") as fh:
                fh.write(NAME + "\n")
            with open(os.path.join(mnt, "marker"), "w") as fh:
                fh.write(ORIGINAL + "\n")
        finally:
            quiet("umount", mnt)
    finally:
        quiet("losetup", "--detach", dev)
        os.rmdir(mnt)
    os.replace(path + ".tmp", path)


def write_config(guest: guest_mod.Guest) -> None:
    with open(CFG, "w") as fh:
        fh.write(f"""# The demo slot: made by `make demo`, removed by `make demo-clean`.
[vmim.local]
vmimages = "{DEMO}/images"
vminserts = "{DEMO}/inserts"
mount = "{DEMO}/mnt"
lockdir = "{DEMO}/locks"
statedir = "{DEMO}/state"
# Software emulation boots everywhere (nested KVM often cannot); use "kvm" on a real host.
virt_type = "qemu"

[vmim.vm.demo]
HostName = "{NAME}"
HostDisk = "{DEMO}/disk.img"
partition = 1
memory = 262144
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
cmdline = "console=ttyS0 quiet vmim.mode=report vmim.report=/marker"
serial_log = "{CONSOLE}"
""")


def wait_for_boot(since: int, timeout: float = 120) -> list:
    """Console lines of the boot that began after byte `since` of the log, until poweroff."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(CONSOLE, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < since:
                    since = 0  # the log was started afresh for this boot
                fh.seek(since)
                text = fh.read().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.startswith("VMIM-")]
        if "VMIM-GUEST: poweroff" in lines:
            return lines
        time.sleep(0.2)
    raise SystemExit(f"demo: the guest did not finish booting within {timeout:.0f} s; see {CONSOLE}")


def console_size() -> int:
    try:
        return os.path.getsize(CONSOLE)
    except FileNotFoundError:
        return 0


def domain_known() -> bool:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", "dominfo", NAME],
                          capture_output=True).returncode == 0


def domain_state() -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", "domstate", NAME],
                          capture_output=True, text=True).stdout.strip()


def wait_shut_off(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = domain_state()
        if state == "shut off":
            return
        time.sleep(0.2)


def demo() -> None:
    say("Setting up the demo slot under " + os.path.relpath(DEMO))
    for d in ("", "images", "inserts"):
        os.makedirs(os.path.join(DEMO, d), exist_ok=True)
    os.chmod(DEMO, 0o755)  # QEMU runs as libvirt-qemu and must reach the disk
    guest = guest_mod.build()
    if not os.path.exists(os.path.join(DEMO, "disk.img")):
        make_disk(os.path.join(DEMO, "disk.img"))
    write_config(guest)
    if domain_known():  # a re-run: start from a stopped slot with the original content
        vmim("-q", "-b", NAME, "-k", "--release")
    print(f"disk {os.path.relpath(DEMO)}/disk.img (MBR, root filesystem on partition 1), "
          f"config {os.path.relpath(CFG)}")

    say("The slots this config knows, and their state in libvirt")
    vmim("-l")

    say("Boot the slot: libvirt does not know it yet, so -u defines it through libvirt.xsl")
    since = console_size()
    vmim("-b", NAME, "-u")
    for line in wait_for_boot(since):
        print("   console: " + line)
    wait_shut_off()

    say("Store the slot as the image 'golden' (tar.zst)")
    vmim("-b", NAME, "--zstd", "-s", "golden", "--release")
    vmim("-L")

    say("Change a file in the guest")
    vmim("-b", NAME, "--mount")
    marker = os.path.join(DEMO, "mnt", NAME, "marker")
    print(f"$ echo 'changed by hand' > {os.path.relpath(marker)}")
    with open(marker, "w") as fh:
        fh.write("changed by hand\n")
    vmim("-b", NAME, "--release")

    say("Reset the slot to 'golden' and boot it, in one command")
    since = console_size()
    vmim("-b", NAME, "-r", "golden", "-u")
    lines = wait_for_boot(since)
    for line in lines:
        print("   console: " + line)
    wait_shut_off()
    proof = f"VMIM-FILE /marker: {ORIGINAL}"
    if proof not in lines:
        raise SystemExit(f"demo: the guest did not report the restored image ({proof!r})")
    say(f"The guest booted the restored image: its console says '{proof}'")
    print("Remove everything the demo made with: make demo-clean")


def clean() -> None:
    if os.path.exists(CFG):
        subprocess.run([TOOL, "--config", CFG, "-q", "-b", NAME, "-k", "--release"],
                       capture_output=True)
    if domain_known():
        if domain_state() != "shut off":  # the guest powers itself off after the demo
            sh("virsh", "-q", "-c", "qemu:///system", "destroy", NAME, check=False)
        sh("virsh", "-q", "-c", "qemu:///system", "undefine", NAME)
    if os.path.isdir(DEMO):
        for line in open("/proc/self/mountinfo"):
            target = line.split()[4]
            if target.startswith(DEMO + "/"):
                sh("umount", target)
        sh("rm", "-rf", "--one-file-system", DEMO)
    print("demo removed")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it mounts the demo slot and talks to qemu:///system)")
    clean() if "--clean" in sys.argv[1:] else demo()
