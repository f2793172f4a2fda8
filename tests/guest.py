"""A real Linux guest that boots in seconds under TCG, built from Debian packages and cached.

Debian's cloud kernel (direct kernel boot) and an initramfs of busybox-static. The initramfs
loads the virtio modules, mounts the root filesystem (`vmim.root=`, default /dev/vda1),
prints what it finds on the serial console, then, by `vmim.mode=`:

- `report` (default): powers off at once;
- `acpi`: waits, and powers off when the power button is pressed (a guest that honours ACPI);
- `ignore`: waits forever and ignores the power button (a guest that ignores ACPI).

Serial lines it prints, for tests to read:
    VMIM-GUEST: booted
    VMIM-ROOT: mounted /dev/vda1            (or VMIM-ROOT: failed /dev/vda1)
    VMIM-FILE /marker: <first line of the file>     (for each vmim.report= path, comma separated)
    VMIM-GUEST: waiting / power button / poweroff
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

CACHE = os.environ.get("VMIM_TEST_CACHE", "/var/cache/vmimagemanager-tests")
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk", "button", "evdev"]
BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in %(modules)s; do insmod /lib/modules/$m.ko 2>/dev/null; done
say() { echo "$*" > /dev/ttyS0; }
say "VMIM-GUEST: booted"
root=/dev/vda1; mode=report; report=/marker
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmim.root=*) root="${arg#vmim.root=}";;
    vmim.mode=*) mode="${arg#vmim.mode=}";;
    vmim.report=*) report="${arg#vmim.report=}";;
  esac
done
i=0; while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
if mount -o ro "$root" /newroot; then
  say "VMIM-ROOT: mounted $root"
  for f in $(echo "$report" | tr , ' '); do
    if [ -f "/newroot$f" ]; then say "VMIM-FILE $f: $(head -n 1 "/newroot$f")";
    else say "VMIM-FILE $f: (missing)"; fi
  done
  umount /newroot
else
  say "VMIM-ROOT: failed $root"
fi
case "$mode" in
  acpi)
    for e in /dev/input/event*; do
      ( dd if="$e" bs=24 count=1 of=/dev/null 2>/dev/null; say "VMIM-GUEST: power button";
        say "VMIM-GUEST: poweroff"; poweroff -f ) &
    done
    say "VMIM-GUEST: waiting"
    while true; do sleep 3600; done;;
  ignore)
    say "VMIM-GUEST: waiting (ignoring ACPI)"
    while true; do sleep 3600; done;;
  *)
    say "VMIM-GUEST: poweroff"
    poweroff -f;;
esac
"""


@dataclass(frozen=True)
class Guest:
    kernel: str
    initrd: str


def _run(*argv: str, cwd: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


def _download(package: str, into: str) -> str:
    try:
        _run("apt-get", "download", package, cwd=into)
    except subprocess.CalledProcessError:
        _run("apt-get", "update", "-qq")
        _run("apt-get", "download", package, cwd=into)
    found = glob.glob(os.path.join(into, f"{package}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {package} left no .deb in {into}")
    return found[0]


def _kernel_package(work: str) -> str:
    meta = _download("linux-image-cloud-amd64", work)
    depends = _run("dpkg-deb", "-f", meta, "Depends")
    for dep in depends.split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != "linux-image-cloud-amd64":
            return _download(name, work)
    raise RuntimeError(f"no kernel package in the Depends of {meta}: {depends}")


def build(cache: str = CACHE) -> Guest:
    """The cached guest; built on first use (downloads the kernel package once)."""
    os.makedirs(cache, mode=0o755, exist_ok=True)
    os.chmod(cache, 0o755)
    kernel = os.path.join(cache, "vmlinuz")
    initrd = os.path.join(cache, "initrd.gz")
    with open(os.path.join(cache, ".lock"), "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        if os.path.exists(kernel) and os.path.exists(initrd):
            return Guest(kernel, initrd)
        with tempfile.TemporaryDirectory(dir=cache) as work:
            deb = _kernel_package(work)
            root = os.path.join(work, "x")
            _run("dpkg", "-x", deb, root)
            vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))[0]
            initramfs = os.path.join(work, "initramfs")
            for d in ("bin", "proc", "sys", "dev", "lib/modules", "newroot"):
                os.makedirs(os.path.join(initramfs, d), exist_ok=True)
            shutil.copy(BUSYBOX, os.path.join(initramfs, "bin", "busybox"))
            for m in MODULES:
                found = glob.glob(os.path.join(root, "lib", "modules", "*", "kernel", "**",
                                               f"{m}.ko*"), recursive=True)
                if not found:
                    raise RuntimeError(f"module {m} not found in {deb}")
                dest = os.path.join(initramfs, "lib", "modules", f"{m}.ko")
                if found[0].endswith(".xz"):
                    with open(dest, "wb") as out:
                        subprocess.run(["xz", "-dc", found[0]], stdout=out, check=True)
                else:
                    shutil.copy(found[0], dest)
            init = os.path.join(initramfs, "init")
            with open(init, "w") as fh:
                fh.write(INIT % {"modules": " ".join(MODULES)})
            os.chmod(init, 0o755)
            names = _run("sh", "-c", "find . | sort", cwd=initramfs)
            archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=initramfs,
                                     input=names.encode(), capture_output=True, check=True).stdout
            with gzip.open(initrd + ".tmp", "wb") as out:
                out.write(archive)
            shutil.copy(vmlinuz, kernel + ".tmp")
            os.chmod(kernel + ".tmp", 0o644)
            os.chmod(initrd + ".tmp", 0o644)
            os.replace(initrd + ".tmp", initrd)
            os.replace(kernel + ".tmp", kernel)
    return Guest(kernel, initrd)


def console_lines(path: str) -> list:
    try:
        with open(path, errors="replace") as fh:
            return [line.strip() for line in fh if line.startswith("VMIM-")]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    g = build()
    print(g.kernel, g.initrd)
