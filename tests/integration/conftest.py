"""Integration tier: root, real loop devices, real libvirtd (see tests/rig.py)."""

import os

from tests.integration.test_images import blank_images, rig  # noqa: F401 — the slots rig
from tests.rig import _test_root, _traversable_tmp, domains, no_leaks, skip_without_host  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip_without_host(items, os.path.dirname(__file__))
