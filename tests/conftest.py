"""Shared helpers for every test tier."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from typing import List, Tuple

import pytest

from vmim.cli import main


class Run:
    """The result of one `main([...])` call: exit code, stdout, stderr."""

    def __init__(self, code: int, out: str, err: str):
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def vmim(capsys):
    """Call the command line in-process: vmim('-l', '--config', path) -> Run."""

    def call(*argv: str) -> Run:
        capsys.readouterr()
        out = io.StringIO()
        code = main(list(argv), stdout=out)
        cap = capsys.readouterr()  # --help and --version print to sys.stdout
        return Run(code, out.getvalue() + cap.out, cap.err)

    return call


@pytest.fixture
def write_config(tmp_path):
    """Write a config file from (dedented) text; returns its path."""
    counter = [0]

    def write(text: str, name: str = "") -> str:
        counter[0] += 1
        path = tmp_path / (name or f"vmim{counter[0]}.cfg")
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def lines_with(text: str, word: str) -> List[str]:
    return [line for line in text.splitlines() if word in line]


def table_rows(text: str) -> List[Tuple[str, ...]]:
    """Rows of a text table (header skipped), split on runs of two or more spaces."""
    import re

    rows = [tuple(re.split(r"\s{2,}", line.strip())) for line in text.strip().splitlines()]
    return rows[1:]


@pytest.fixture(autouse=True)
def _no_config_from_environment(monkeypatch):
    """Tests choose their config explicitly; a developer's $VMIM_CFG must not leak in."""
    monkeypatch.delenv("VMIM_CFG", raising=False)
    monkeypatch.delenv("VMIM_LOG_CONF", raising=False)


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_addoption(parser):
    parser.addoption("--regenerate-output", action="store_true", default=False,
                     help="rewrite the expected-output files (tests/plans/*.txt) from what the "
                     "code produces now, instead of comparing with them; review the diff")


@pytest.fixture
def regenerate(request) -> bool:
    return bool(request.config.getoption("--regenerate-output"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def as_user(argv, cwd):
    """Run argv as 'nobody' when we are root, else as ourselves."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run as another user")
        prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, "LANG": "C.UTF-8"}
    probe = subprocess.run([*prefix, sys.executable, "-c", "import vmim.cli, libvirt"],
                           capture_output=True, text=True, env=env, cwd=cwd)
    if probe.returncode != 0:
        pytest.skip(f"'nobody' cannot run this tree's Python: {probe.stderr.strip()[-200:]}")
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env, cwd=cwd)
