"""The packaging files agree with the code on the version (make deb refuses otherwise)."""

from __future__ import annotations

import os
import re

from vmim import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


def test_debian_changelog_is_at_the_code_version():
    top = read("debian/changelog").splitlines()[0]
    assert top.startswith(f"vmimagemanager ({__version__}) "), \
        f"add a debian/changelog entry for {__version__}: {top}"


def test_rpm_spec_defaults_to_the_code_version():
    m = re.search(r"^Version:.*version_override:([^}]+)\}", read("rpm/vmimagemanager.spec"), re.M)
    assert m and m.group(1) == __version__
    assert f"- {__version__}-1\n" in read("rpm/vmimagemanager.spec")


def test_pyproject_takes_the_version_from_the_code():
    text = read("pyproject.toml")
    assert 'dynamic = ["version"]' in text and 'version = {attr = "vmim.__version__"}' in text
