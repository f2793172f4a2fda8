"""vmim.sandbox's argv (no root needed: nothing is run)."""

from __future__ import annotations

import os

import pytest

from vmim import sandbox


@pytest.fixture(autouse=True)
def _bwrap_anywhere(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "/usr/bin/bwrap")


def _pairs(argv, option):
    return [tuple(argv[i + 1:i + 3]) for i, a in enumerate(argv) if a == option]


def test_only_usr_and_the_named_binds_come_from_the_host():
    argv = sandbox.command(["tar", "--extract"], [sandbox.Bind("/host/slot", "/slot", True),
                                                  sandbox.Bind("/host/image", "/image")],
                           caps=sandbox.UNPACK)
    assert _pairs(argv, "--ro-bind") == [("/usr", "/usr"), ("/host/image", "/image")]
    assert _pairs(argv, "--bind") == [("/host/slot", "/slot")]
    assert not {"--dev-bind", "--bind-try", "--ro-bind-try"} & set(argv)
    for flag in ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--die-with-parent", "--clearenv"):
        assert flag in argv
    assert "--unshare-user" not in argv  # root stays root: owners, device nodes, xattrs
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--seccomp") + 1] == sandbox.SECCOMP_FD  # process.popen() opens it
    assert argv[0] == "/usr/bin/bwrap"  # under process.dies_with_run, as every command
    last = len(argv) - 1 - argv[::-1].index("--")
    assert argv[last + 1:] == ["/usr/bin/tar", "--extract"]
    assert argv.index("--seccomp") < last  # bwrap's option, not the command's
    assert sandbox.shown(argv) == ["tar", "--extract"]


def test_capabilities_are_only_those_of_the_bounding_set(monkeypatch):
    monkeypatch.setattr(sandbox, "_bounding_set", lambda: (1 << 0) | (1 << 27))
    assert sandbox.capabilities(sandbox.UNPACK) == ["CAP_CHOWN", "CAP_MKNOD"]
    assert sandbox.capabilities(sandbox.READ) == []
    argv = sandbox.command(["true"], [], caps=sandbox.UNPACK_XATTRS)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"] == \
        ["CAP_CHOWN", "CAP_MKNOD"]


@pytest.mark.parametrize("inside", ["/", "/usr", "/usr/", "relative", "/proc", "/dev", "/tmp",
                                    "/etc", "/slot/sub"])
def test_a_bind_never_hides_the_sandbox_own_trees(inside):
    with pytest.raises(ValueError):
        sandbox.command(["true"], [sandbox.Bind("/x", inside)], caps=sandbox.NONE)


def test_a_program_outside_usr_is_refused(tmp_path):
    from vmim.errors import ToolMissingError

    tool = tmp_path / "tar"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    with pytest.raises(ToolMissingError) as info:
        sandbox.command([str(tool)], [], caps=sandbox.NONE)
    assert "sees only /usr" in str(info.value)


def test_plain_argv_is_shown_as_it_is():
    assert sandbox.shown(["rsync", "-a"]) == ["rsync", "-a"]


def test_the_guest_root_has_one_name_inside():
    from vmim import tree

    assert tree.GUEST == sandbox.SLOT  # tree keeps its own copy: the child imports it lightly


# ------------------------------------------------------------------ the capabilities of each call


def _kept(argv):
    """The capabilities a sandbox argv keeps: all dropped first, then these added."""
    drop = argv.index("--cap-drop")
    assert argv[drop + 1] == "ALL"
    added = [i + 1 for i, a in enumerate(argv) if a == "--cap-add"]
    assert all(i > drop for i in added)
    return [argv[i] for i in added]


def _sandboxed_commands(monkeypatch, call):
    """The sandboxed argvs call() starts: process.run/pipeline record them instead of running
    (the argv is the thing tested here; tests/integration runs them)."""
    from vmim import process

    seen = []

    def record(stages):
        seen.extend(s for s in stages if getattr(s, "shown", None) is not None)

    monkeypatch.setattr(process, "run", lambda argv, **kw: record([argv]))
    monkeypatch.setattr(process, "pipeline", lambda stages, **kw: record(stages))
    monkeypatch.setattr(process, "fan_out", lambda path, source, sinks: record(
        [s.argv for s in sinks]))
    monkeypatch.setattr(sandbox, "_bounding_set", lambda: (1 << 64) - 1)
    try:
        call()
    except Exception:  # noqa: BLE001 — guestwork.call() gets no answer from a recorder
        pass
    assert seen, "no sandboxed command"
    return seen


def _call_sites(tmp_path):
    from vmim import tree
    from vmim.archive.cpio import CpioFormat
    from vmim.archive.rsync import RsyncFormat
    from vmim.archive.tar import TarFormat

    d = str(tmp_path)
    return {
        "tar store": (lambda: TarFormat("zstd", "tar.zst").write(d, ["."], f"{d}/img"),
                      sandbox.READ_XATTRS),
        "tar unpack": (lambda: TarFormat("zstd", "tar.zst").unpack(f"{d}/img", d),
                       sandbox.UNPACK_XATTRS),
        "tar proof": (lambda: TarFormat("zstd", "tar.zst").read_structure(f"{d}/img"),
                      sandbox.NONE),
        "cpio store (find, cpio)": (lambda: CpioFormat("bzip2", "cpio.bz2").write(
            d, ["."], f"{d}/img"), sandbox.READ),
        "newc unpack": (lambda: CpioFormat(None, "cpio").unpack(f"{d}/img", d), sandbox.UNPACK),
        "cpio survey": (lambda: CpioFormat("bzip2", "cpio.bz2").check_tree(d, "x"),
                        sandbox.READ),
        "rsync store": (lambda: RsyncFormat().write(d, ["."], f"{d}/tree"), sandbox.COPY),
        "rsync unpack": (lambda: RsyncFormat().unpack(f"{d}/tree", d), sandbox.COPY),
        "rsync mirror": (lambda: RsyncFormat().mirror(f"{d}/tree", d), sandbox.COPY),
        "remove": (lambda: tree.remove(d, ["a", "b"]), sandbox.DELETE),
        "merge": (lambda: tree.merge_contained(f"{d}/staging", d), sandbox.MERGE),
        "prepare": (lambda: tree.prepare_contained(f"{d}/staging", d, "/etc"), sandbox.MERGE),
    }


@pytest.mark.parametrize("site", ["tar store", "tar unpack", "tar proof",
                                  "cpio store (find, cpio)", "cpio survey",
                                  "newc unpack", "rsync store", "rsync unpack", "rsync mirror",
                                  "remove", "merge", "prepare"])
def test_each_call_site_keeps_exactly_the_capabilities_of_its_set(site, tmp_path, monkeypatch):
    call, caps = _call_sites(tmp_path)[site]
    for argv in _sandboxed_commands(monkeypatch, call):
        assert sorted(_kept(argv)) == sorted(caps), (site, sandbox.shown(argv))


def test_the_sets_are_least_privilege_by_construction():
    assert sandbox.NONE == frozenset()
    assert sandbox.READ == {"CAP_DAC_READ_SEARCH"}  # reads, never writes
    for name in ("NONE", "READ", "READ_XATTRS"):
        assert not sandbox.SETS[name] & {"CAP_CHOWN", "CAP_MKNOD", "CAP_DAC_OVERRIDE",
                                         "CAP_FOWNER", "CAP_SETFCAP"}, name
    assert sandbox.UNPACK < sandbox.UNPACK_XATTRS < sandbox.COPY
    assert "CAP_MKNOD" not in sandbox.DELETE | sandbox.MERGE  # they make no device node
    assert "CAP_SYS_ADMIN" not in sandbox.UNPACK  # newc carries no xattrs
    for caps in sandbox.SETS.values():
        assert caps <= set(sandbox.CAPABILITIES)


def test_a_command_without_caps_is_a_type_error():
    with pytest.raises(TypeError):
        sandbox.command(["true"], [])  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        sandbox.command(["true"], [], caps=frozenset({"CAP_SYS_PTRACE"}))


def test_each_command_gets_a_descriptor_of_the_filter_of_its_own_read_from_its_start():
    """bwrap reads its --seccomp descriptor to the end: popen() gives each command a new one,
    the whole program, and none stays open here."""
    from vmim import process, seccomp

    before = set(os.listdir("/proc/self/fd"))
    read = "import os, sys; print(len(os.read(int(sys.argv[1]), 1 << 20)))"
    sizes = [process.run(["python3", "-c", read, sandbox.SECCOMP_FD],
                         capture=True).stdout.strip() for _ in range(2)]
    assert sizes == [str(len(seccomp.build()))] * 2
    assert set(os.listdir("/proc/self/fd")) - before <= {str(seccomp._memfd())}


def test_the_sandboxed_child_answers_whatever_its_operation_raises(monkeypatch, capsys):
    """An exception that is neither the tool's error nor an OSError (os.makedev's
    OverflowError on a device number of 2^32 - 1, say) gave a traceback and no answer; the
    caller then said only that the operation "gave no answer"."""
    import json

    from vmim import errors, guestwork

    def boom(req):
        raise OverflowError("Python int too large to convert to C unsigned int")

    monkeypatch.setitem(guestwork.OPERATIONS, "extract-newc", boom)
    code = guestwork.child(["extract-newc", "{}"])
    out, err = capsys.readouterr()
    answer = json.loads(out.splitlines()[-1])
    assert code == errors.EXIT_FAILED
    assert answer["error"] == "OperationError" and "OverflowError" in answer["message"]
    assert "Traceback" in err


@pytest.mark.parametrize("op, result, ok", [
    ("merge", 3, True), ("merge", -1, False), ("merge", True, False), ("merge", "3", False),
    ("merge", None, False), ("extract-newc", 0, True), ("extract-newc", [1], False),
    ("prepare", None, True), ("prepare", 0, False), ("survey-cpio", {}, True),
    ("survey-cpio", [], False),
])
def test_what_a_sandboxed_operation_answers_is_checked_before_it_is_believed(
        monkeypatch, op, result, ok):
    """The child read guest data: its answer is data of one declared type per operation
    (a merge's count, nothing for prepare...), or an internal error."""
    import json

    from vmim import errors, guestwork, process

    def answer(stages, stdout_fd, **kw):
        os.write(stdout_fd, json.dumps({"result": result}).encode() + b"\n")

    monkeypatch.setattr(process, "pipeline", answer)
    assert set(guestwork.RESULTS) == set(guestwork.OPERATIONS)
    if ok:
        assert guestwork.call(op, {}, [], caps=sandbox.NONE) == result
    else:
        with pytest.raises(errors.OperationError, match=f"{op} in the sandbox answered"):
            guestwork.call(op, {}, [], caps=sandbox.NONE)
