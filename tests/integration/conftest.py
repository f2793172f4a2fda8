"""Integration tier: root, real loop devices, real libvirtd (see tests/rig.py)."""

import os

from tests.rig import _traversable_tmp, domains, no_leaks, skip_without_host  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip_without_host(items, os.path.dirname(__file__))
