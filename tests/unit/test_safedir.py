"""Root-owned state only in directories no other user can write: the lock directory and the
state directory are verified from / down, and their files never follow a symlink.

The attacks are made for real, by another user (nobody, through setpriv): they need root."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import is_root
from vmim import incomplete, lock, safedir
from vmim.config import Config, Slot
from vmim.errors import EXIT_ENVIRONMENT
from vmim.keys import default

needs_root = pytest.mark.skipif(not is_root(), reason="acting as another user (nobody) needs root")


def as_nobody(script: str) -> None:
    """Run a shell script as user nobody, as a local unprivileged user would."""
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                    "sh", "-euc", script], check=True)


@pytest.fixture
def public(tmp_path):
    """A directory like /run/lock or /tmp (root-owned, sticky, writable by all) that user nobody
    can reach, and a file of the test's own that an attacker would like root to overwrite."""
    for d in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        os.chmod(d, stat.S_IMODE(os.stat(d).st_mode) | 0o001)  # add search for others only
    run_lock = tmp_path / "run-lock"
    run_lock.mkdir()
    os.chmod(run_lock, 0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return run_lock, victim


def _cfg(statedir: str) -> Config:
    return Config(path="test.cfg", format="current", statedir=statedir)


def _slot() -> Slot:
    return Slot(name="web1", section="vmim.vm.web1", store_type="partition", mount="/mnt/web1",
                root="/dev/null")


# ------------------------------------------------------------------ the lock directory


@needs_root
def test_a_lock_directory_another_user_made_first_is_refused_and_no_symlink_followed(public):
    """Finding 6: a user creates vmimagemanager/ under /run/lock before root does and plants
    <box>.lock -> a file of root's: root's next run truncated it."""
    run_lock, victim = public
    lockdir = run_lock / "vmimagemanager"
    as_nobody(f"mkdir -m 0777 {lockdir} && ln -s {victim} {lockdir}/web1.lock")
    with pytest.raises(safedir.UnsafeDirectoryError) as err:
        with lock.slot_lock(str(lockdir), "web1"):
            pass
    assert err.value.exit_code == EXIT_ENVIRONMENT
    assert str(lockdir) in str(err.value) and "owned by" in str(err.value)
    assert "lockdir" in str(err.value)  # the remedy: another lock directory
    assert victim.read_text() == "precious\n"


@needs_root
def test_a_symlinked_lock_file_in_a_safe_directory_is_not_followed(tmp_path, public):
    _, victim = public
    lockdir = tmp_path / "locks"
    lockdir.mkdir(mode=0o755)
    os.symlink(victim, lockdir / "web1.lock")
    with pytest.raises(safedir.UnsafeDirectoryError, match="symlink"):
        with lock.slot_lock(str(lockdir), "web1"):
            pass
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_a_lock_directory_others_can_write_is_refused_with_the_remedy(tmp_path, mode):
    lockdir = tmp_path / "locks"
    lockdir.mkdir()
    os.chmod(lockdir, mode)
    if mode == 0o775:
        os.chown(lockdir, -1, 65534 if is_root() else os.getgid())
        if not is_root() and os.getgid() == 0:
            pytest.skip("a group other than root's needs root to set")
    with pytest.raises(safedir.UnsafeDirectoryError) as err:
        with lock.slot_lock(str(lockdir), "web1"):
            pass
    msg = str(err.value)
    assert "writable by" in msg and f"chmod go-w {lockdir}" in msg and "lockdir" in msg
    assert os.listdir(lockdir) == []


@needs_root
def test_a_parent_another_user_owns_is_refused(public):
    run_lock, _ = public
    as_nobody(f"mkdir -m 0755 {run_lock}/mine")
    lockdir = run_lock / "mine" / "locks"
    with pytest.raises(safedir.UnsafeDirectoryError, match=f"{run_lock}/mine is owned by"):
        with lock.slot_lock(str(lockdir), "web1"):
            pass
    assert not lockdir.exists()


@needs_root
def test_a_symlink_another_user_made_on_the_way_is_not_followed(tmp_path, public):
    run_lock, _ = public
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    as_nobody(f"ln -s {target} {run_lock}/vmimagemanager")
    with pytest.raises(safedir.UnsafeDirectoryError, match="symlink"):
        with lock.slot_lock(str(run_lock / "vmimagemanager"), "web1"):
            pass
    assert os.listdir(target) == []


def test_root_owned_symlinks_and_sticky_parents_are_fine(tmp_path):
    """/var/lock -> /run/lock style symlinks of root's, and a sticky parent like /run/lock."""
    run_lock = tmp_path / "run-lock"
    run_lock.mkdir()
    os.chmod(run_lock, 0o1777)
    os.symlink(run_lock, tmp_path / "var-lock")
    lockdir = tmp_path / "var-lock" / "vmimagemanager"
    with lock.slot_lock(str(lockdir), "web1"):
        assert lock.holder(str(lockdir), "web1").pid == os.getpid()
    made = run_lock / "vmimagemanager"
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) & 0o022 == 0
    assert os.listdir(made) == ["web1.lock"]


def test_the_default_lock_directory_is_where_no_user_can_create_it():
    lockdir = default("lockdir")
    assert not lockdir.startswith(("/run/lock", "/var/lock", "/tmp", "/var/tmp", "/dev/shm"))
    parent = os.path.dirname(lockdir)
    while parent != "/":  # every parent that exists on this host: nobody else can write it
        if os.path.isdir(parent):
            st = os.stat(parent)
            assert st.st_mode & 0o002 == 0 and st.st_uid == 0, parent
        parent = os.path.dirname(parent)


# ------------------------------------------------------------------ the state directory


@needs_root
def test_a_state_directory_another_user_made_is_refused_and_no_symlink_followed(public):
    run_lock, victim = public
    statedir = run_lock / "state"
    as_nobody(f"mkdir -m 0777 {statedir} && ln -s {victim} {statedir}/web1.incomplete "
              f"&& ln -s {victim} {statedir}/web1.incomplete.{os.getpid()}")
    with pytest.raises(safedir.UnsafeDirectoryError, match="statedir"):
        incomplete.write(_cfg(str(statedir)), _slot(), "golden")
    assert victim.read_text() == "precious\n"
    # a user who could write there could also remove the mark of a half-written slot
    with pytest.raises(safedir.UnsafeDirectoryError):
        incomplete.read(_cfg(str(statedir)), _slot())


def test_a_state_directory_others_can_write_is_refused(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    os.chmod(statedir, 0o777)
    with pytest.raises(safedir.UnsafeDirectoryError) as err:
        incomplete.write(_cfg(str(statedir)), _slot(), "golden")
    assert f"chmod go-w {statedir}" in str(err.value) and "statedir" in str(err.value)
    assert os.listdir(statedir) == []


def test_a_mark_round_trips_in_a_safe_state_directory(tmp_path):
    cfg = _cfg(str(tmp_path / "state" / "sub"))
    assert incomplete.read(cfg, _slot()) is None  # not made yet: no mark
    incomplete.write(cfg, _slot(), "golden")
    assert incomplete.read(cfg, _slot())["image"] == "golden"
    assert os.listdir(tmp_path / "state" / "sub") == ["web1.incomplete"]
    assert incomplete.remove(cfg, _slot()) is True
    assert incomplete.read(cfg, _slot()) is None


@needs_root
def test_a_symlinked_mark_is_not_read(tmp_path, public):
    _, victim = public
    statedir = tmp_path / "state"
    statedir.mkdir(mode=0o755)
    os.symlink(victim, statedir / "web1.incomplete")
    mark = incomplete.read(_cfg(str(statedir)), _slot())  # refused: the slot counts as marked
    assert mark is not None and "precious" not in str(mark)


# ------------------------------------------------------------------ the module itself


def test_files_are_created_new_and_never_read_through_symlinks(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("secret\n")
    with safedir.open_dir(str(tmp_path / "d"), what="test directory") as d:
        os.close(d.create("a", 0o600))
        with pytest.raises(FileExistsError):
            d.create("a", 0o600)
        assert d.read("missing") is None
        os.symlink(secret, tmp_path / "d" / "link")
        with pytest.raises(safedir.UnsafeDirectoryError, match="symlink"):
            d.read("link")
        d.write_atomic("link", b"new\n")  # replaces the name, never writes through it
        assert d.read("link") == b"new\n" and secret.read_text() == "secret\n"
        with pytest.raises(ValueError):
            d.read("../secret")
        assert sorted(d.listdir()) == ["a", "link"]
        assert d.unlink("a") is True and d.unlink("a") is False


def test_probing_a_lock_directory_that_is_missing_or_a_file_finds_no_holder(tmp_path):
    assert lock.holder(str(tmp_path / "missing"), "web1") is None
    assert not (tmp_path / "missing").exists()  # a probe creates nothing
    (tmp_path / "file").write_text("not a directory\n")
    assert lock.holder(str(tmp_path / "file"), "web1") is None


@pytest.mark.parametrize("text", ["[" * 200_000, '{"a":' * 100_000, "[]", "{}", "\xff"])
def test_a_mark_or_a_re_make_record_that_is_not_one_is_read_as_such(tmp_path, text):
    """Nested deeper than the decoder goes, Python's json raises RecursionError, not a
    ValueError: an internal error (exit 1) on the main of 2026-12-07. A mark that cannot be
    read counts as a mark (the slot is not started); a record that cannot be read is a
    ValueError, which the mount turns into exit 4 naming the file."""
    cfg = _cfg(str(tmp_path / "state"))
    incomplete.write(cfg, _slot(), "golden")
    (tmp_path / "state" / "web1.incomplete").write_text(text, errors="surrogateescape")
    mark = incomplete.read(cfg, _slot())
    assert mark is not None and mark["image"] == "?", mark
    incomplete.write_remake(cfg, _slot(), {"type": "ext4"}, 1 << 20)
    with open(incomplete.remake_path(cfg, _slot()), "w", errors="surrogateescape") as fh:
        fh.write(text)
    with pytest.raises(ValueError):
        incomplete.read_remake(cfg, _slot())
