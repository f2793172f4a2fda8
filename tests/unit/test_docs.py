"""The man page and the config reference cover every flag and every key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from vmim.cli import build_parser
from vmim.config import KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


def help_flags():
    text = build_parser().format_help()
    return sorted(set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text)))


@pytest.fixture(scope="module")
def rendered_man():
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    res = subprocess.run(["man", "-l", os.path.join(ROOT, "docs", "vmimagemanager.1")],
                         capture_output=True, text=True, env={**os.environ, "MANWIDTH": "200"})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_man_renders_and_names_every_flag_of_help(rendered_man):
    flags = help_flags()
    assert "--restore" in flags and "-b" in flags and len(flags) > 50
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", rendered_man)]
    assert missing == []


def test_man_names_every_config_key_and_exit_code(rendered_man):
    for k in KEYS:
        assert re.search(rf"^\s+{re.escape(k.ini)}(\s|$)", rendered_man, re.M), k.ini
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "130, 143"):
        assert re.search(rf"^\s+{re.escape(code)}(\s|$)", rendered_man, re.M), code
    assert "EXAMPLES" in rendered_man and "vmimagemanager -b web1 -r golden -i certs -u" in rendered_man


def test_config_reference_names_every_key():
    text = read("docs/config.md")
    for k in KEYS:
        assert f"| `{k.ini}` |" in text, k.ini


def test_man_has_one_options_section_and_no_literal_markup(rendered_man):
    headings = re.findall(r"^([A-Z][A-Z ()]+)$", rendered_man, re.M)
    assert headings.count("OPTIONS") == 1, headings
    assert "`" not in rendered_man
    # optional values are shown as optional, required ones as required
    assert "-p [FILE], --print-config [FILE]" in rendered_man
    assert "--syslog [SOCKET]" in rendered_man
    assert "-b BOX, --box BOX" in rendered_man


def test_help_has_one_options_section():
    text = build_parser().format_help()
    assert text.count("\noptions:\n") == 1
    assert "-h, --help" in text and "--version" in text and "--connect URI" in text


def test_completion_offers_every_long_flag_and_files_for_config():
    text = read("completions/vmimagemanager")
    long_flags = [f for f in help_flags() if f.startswith("--")]
    missing = [f for f in long_flags if f not in text]
    assert missing == []
    assert "-F _shtab_vmimagemanager vmimagemanager" in text


def _complete(tmp_path, *words):
    """What bash offers for the last word, with the committed completion file loaded and
    this tree's vmimagemanager first on $PATH."""
    bindir = tmp_path / "bin"
    if not bindir.exists():
        bindir.mkdir()
        tool = bindir / "vmimagemanager"
        tool.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m vmim \"$@\"\n")
        tool.chmod(0o755)
    script = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
              '_shtab_vmimagemanager; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "VMIM_CFG": str(tmp_path / "env.cfg")}
    res = subprocess.run(["bash", "-c", script, "bash",
                          os.path.join(ROOT, "completions", "vmimagemanager"), *words],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_completion_in_bash_completes_flags_and_config_files(tmp_path):
    (tmp_path / "site.cfg").write_text("")
    assert _complete(tmp_path, "vmimagemanager", "--conf") == ["--config"]
    assert _complete(tmp_path, "vmimagemanager", "--con") == ["--config", "--connect"]
    assert _complete(tmp_path, "vmimagemanager", "--config", "si") == ["site.cfg"]


def test_completion_of_b_offers_the_slots_of_the_config_on_the_line(tmp_path):
    (tmp_path / "site.cfg").write_text('[vmim.vm.1]\nHostName = "web1"\nroot = "/dev/null"\n'
                                       '[vmim.vm.2]\nHostName = "build2"\nroot = "/dev/zero"\n')
    (tmp_path / "env.cfg").write_text('[vmim.vm.1]\nHostName = "envbox"\nroot = "/dev/null"\n')
    assert _complete(tmp_path, "vmimagemanager", "--config", "site.cfg", "-b", "") == \
        ["any-free", "web1", "build2"]
    assert _complete(tmp_path, "vmimagemanager", "-c", "site.cfg", "--box", "w") == ["web1"]
    assert _complete(tmp_path, "vmimagemanager", "-b", "") == ["any-free", "envbox"]  # $VMIM_CFG
