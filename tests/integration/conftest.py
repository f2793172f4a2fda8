"""Integration tier: root, real loop devices, real libvirtd (see tests/rig.py)."""

import os
import subprocess
import sys

import pytest

from tests.integration import diskimages as di
from tests.integration.test_images import blank_images, rig  # noqa: F401 — the slots rig
from tests.rig import _test_root, _traversable_tmp, domains, no_leaks, skip_without_host  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip_without_host(items, os.path.dirname(__file__))


@pytest.fixture
def root_slot(tmp_path, write_config, domains):  # noqa: F811 — the fixture imported above
    """One root-filesystem slot (tmp_path/slot.img, made by the test with make()) and an empty
    image store (images); config(clear) writes a config for it; released at the end."""
    os.chmod(tmp_path, 0o755)
    images = tmp_path / "images"
    images.mkdir()
    name = domains.name("slot")

    class Slot:
        img = str(tmp_path / "slot.img")
        mnt = str(tmp_path / "mnt" / name)
        box = name

        def __init__(self):
            self.images = images

        def config(self, clear=None):
            return write_config(f"""\
            [vmim.local]
            mount = "{tmp_path}/mnt"
            lockdir = "{tmp_path}/locks"
            statedir = "{tmp_path}/state"
            vmimages = "{images}"
            [vmim.vm.slot]
            HostName = "{name}"
            root = "{self.img}"
            """ + (f'clear = "{clear}"\n' if clear else ""))

        def make(self, size_mib, mkfs, tune=None):
            di.sparse_file(self.img, size_mib * 1024 * 1024)
            di.run(*mkfs, self.img)
            if tune:
                di.run(*tune, self.img)

    s = Slot()
    yield s
    subprocess.run([sys.executable, "-m", "vmim", "--config", s.config(), "-b", name,
                    "--release"], capture_output=True)
