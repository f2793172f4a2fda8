"""vmim.sandbox's argv (no root needed: nothing is run)."""

from __future__ import annotations

import pytest

from vmim import sandbox


@pytest.fixture(autouse=True)
def _bwrap_anywhere(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "/usr/bin/bwrap")
    monkeypatch.setattr(sandbox, "_setpriv", lambda: "/usr/bin/setpriv")


def _pairs(argv, option):
    return [tuple(argv[i + 1:i + 3]) for i, a in enumerate(argv) if a == option]


def test_only_usr_and_the_named_binds_come_from_the_host():
    argv = sandbox.command(["tar", "--extract"], [sandbox.Bind("/host/slot", "/slot", True),
                                                  sandbox.Bind("/host/image", "/image")])
    assert _pairs(argv, "--ro-bind") == [("/usr", "/usr"), ("/host/image", "/image")]
    assert _pairs(argv, "--bind") == [("/host/slot", "/slot")]
    assert not {"--dev-bind", "--bind-try", "--ro-bind-try"} & set(argv)
    for flag in ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--die-with-parent", "--clearenv"):
        assert flag in argv
    assert "--unshare-user" not in argv  # root stays root: owners, device nodes, xattrs
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[:5] == ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", "/usr/bin/bwrap"]
    last = len(argv) - 1 - argv[::-1].index("--")
    assert argv[last + 1:] == ["/usr/bin/tar", "--extract"]
    assert sandbox.shown(argv) == ["tar", "--extract"]


def test_capabilities_are_only_those_of_the_bounding_set(monkeypatch):
    monkeypatch.setattr(sandbox, "_bounding_set", lambda: (1 << 0) | (1 << 27))
    assert sandbox.capabilities() == ["CAP_CHOWN", "CAP_MKNOD"]
    argv = sandbox.command(["true"], [])
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"] == \
        ["CAP_CHOWN", "CAP_MKNOD"]


@pytest.mark.parametrize("inside", ["/", "/usr", "/usr/", "relative", "/proc", "/dev", "/tmp",
                                    "/etc", "/slot/sub"])
def test_a_bind_never_hides_the_sandbox_own_trees(inside):
    with pytest.raises(ValueError):
        sandbox.command(["true"], [sandbox.Bind("/x", inside)])


def test_a_program_outside_usr_is_refused(tmp_path):
    from vmim.errors import ToolMissingError

    tool = tmp_path / "tar"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    with pytest.raises(ToolMissingError) as info:
        sandbox.command([str(tool)], [])
    assert "sees only /usr" in str(info.value)


def test_plain_argv_is_shown_as_it_is():
    assert sandbox.shown(["rsync", "-a"]) == ["rsync", "-a"]


def test_the_guest_root_has_one_name_inside():
    from vmim import tree

    assert tree.GUEST == sandbox.SLOT  # tree keeps its own copy: the child imports it lightly
