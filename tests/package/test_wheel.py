"""pyproject.toml: plain pip builds a wheel and installs it, with the man page, the bash
completion and the template under the installation prefix."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from vmim import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = f"vmimagemanager-{__version__}.data/data/share/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # --no-deps: libvirt-python would be compiled; the package's own build is what is tested
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                          ROOT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def test_wheel_carries_the_package_script_and_data_files(wheel):
    assert os.path.basename(wheel) == f"vmimagemanager-{__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vmim/cli.py", "vmim/archive/__init__.py", "vmim/disk/__init__.py"} <= names
    for rel in ("man/man1/vmimagemanager.1", "bash-completion/completions/vmimagemanager",
                "vmimagemanager/vmimagemanager.cfg.template", "vmimagemanager/libvirt.xsl"):
        assert DATA + rel in names, rel
    entry_points = zipfile.ZipFile(wheel).read(
        f"vmimagemanager-{__version__}.dist-info/entry_points.txt").decode()
    assert "vmimagemanager = vmim.cli:run" in entry_points
    metadata = zipfile.ZipFile(wheel).read(
        f"vmimagemanager-{__version__}.dist-info/METADATA").decode()
    for dep in ("Requires-Dist: libvirt-python", "Requires-Dist: python-magic",
                "Requires-Dist: lxml"):
        assert dep in metadata


def test_pip_installed_command_runs_and_names_its_template(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # without $PYTHONPATH: a source tree on it would count as vmimagemanager installed already
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", wheel],
                         capture_output=True, text=True, env=clean_env)
    assert res.returncode == 0, res.stderr
    tool = str(venv / "bin" / "vmimagemanager")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # not the source tree's vmim
    res = subprocess.run([tool, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"vmimagemanager {__version__}", res
    assert (venv / "share" / "man" / "man1" / "vmimagemanager.1").is_file()
    res = subprocess.run([tool, "--config", str(tmp_path / "none.cfg"), "-L"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert res.returncode == 3, res
    template = venv / "share" / "vmimagemanager" / "vmimagemanager.cfg.template"
    assert f"copy the template {template} there" in res.stderr


def test_setup_py_answers_as_the_original_s_did():
    """Users of 0.3 ran `python setup.py --version`: setup.py and setup.cfg describe the same
    package as pyproject.toml."""
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == __version__
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.stdout.strip().splitlines()[-1] == "vmimagemanager"
