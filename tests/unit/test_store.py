"""The image store without root: atomic replacement, debris of killed runs, names, metadata."""

from __future__ import annotations

import errno
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.conftest import as_user
from vmim import digest, process
from vmim.archive import detect, for_name
from vmim.archive.rsync import ROOT_MODE
from vmim.errors import CommandError, UsageError
from vmim.store import META_DIR, OLD_PREFIX, TMP_PREFIX, ImageStore, StoreFullError, validate_name


@pytest.fixture
def src(tmp_path):
    """A small tree to store."""
    d = tmp_path / "src"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hostname").write_text("guest\n")
    return d


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return d


def _store(images, src, name, fmt_name):
    fmt = for_name(fmt_name)
    return ImageStore(str(images)).write(name, fmt, functools.partial(fmt.write, str(src), ["."]),
                                         {})


def _is_complete_image(path):
    """The name holds one of the two images the test stored (tree or tar.gz), whole."""
    if os.path.isdir(path):
        return open(os.path.join(path, "etc", "hostname")).read() == "guest\n"
    return detect.detect(path).format == "tgz" and subprocess.run(
        ["tar", "-tzf", path], capture_output=True, check=True).stdout.count(b"hostname") == 1


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# A store that is SIGKILLed right after its k-th rename (or exchange) in the store directory.
KILLED_STORE = textwrap.dedent("""
    import functools, os, signal, sys
    from vmim import store
    from vmim.archive import for_name
    src, images, name, fmt_name, k = sys.argv[1:]
    count = [0]
    def killing(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            count[0] += 1
            if count[0] == int(k):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped
    os.rename, os.replace = killing(os.rename), killing(os.replace)
    store._exchange = killing(store._exchange)
    fmt = for_name(fmt_name)
    store.ImageStore(images).write(name, fmt, functools.partial(fmt.write, src, ["."]), {})
""")


@pytest.mark.parametrize("old_fmt,new_fmt", [("tgz", "rsync"), ("rsync", "tgz")])
@pytest.mark.parametrize("k", [1, 2])
def test_a_store_changing_format_killed_at_any_step_leaves_an_image_under_its_name(
        images, src, old_fmt, new_fmt, k):
    _store(images, src, "golden", old_fmt)
    proc = subprocess.run([sys.executable, "-c", KILLED_STORE, str(src), str(images), "golden",
                           new_fmt, str(k)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode in (-9, 0)  # killed, or it ended before its k-th rename
    golden = images / "golden"
    assert os.path.lexists(golden), f"no image under the name after a kill at rename {k}"
    assert _is_complete_image(golden)
    # the next store of another name cleans the debris and keeps the image
    _store(images, src, "other", "tgz")
    assert _is_complete_image(golden)
    assert not [n for n in os.listdir(images) if n.startswith((TMP_PREFIX, OLD_PREFIX))]


def test_debris_cleanup_puts_back_the_only_copy_of_a_name(images, src):
    """What a run killed between 'set the old image aside' and 'put the new one in' leaves:
    the old image under the set-aside name, the new one under its temporary name, nothing
    under the name itself. The old image goes back to its name; it is not deleted."""
    pid = _dead_pid()
    _store(images, src, "golden", "rsync")
    os.rename(images / "golden", images / f"{OLD_PREFIX}golden.{pid}")
    (images / f"{TMP_PREFIX}golden.{pid}").write_bytes(b"a new image, maybe incomplete")
    removed = ImageStore(str(images)).clean_debris()
    assert removed == [f"{TMP_PREFIX}golden.{pid}"]
    assert _is_complete_image(images / "golden") and os.path.isdir(images / "golden")
    assert sorted(os.listdir(images)) == [".vmim", "golden"]


def test_debris_cleanup_removes_a_set_aside_image_whose_name_is_taken(images, src):
    pid = _dead_pid()
    _store(images, src, "golden", "rsync")
    _store(images, src, f"{OLD_PREFIX}golden.{pid}"[1:], "rsync")  # a tree to stand as debris
    os.rename(images / f"{OLD_PREFIX}golden.{pid}"[1:], images / f"{OLD_PREFIX}golden.{pid}")
    assert ImageStore(str(images)).clean_debris() == [f"{OLD_PREFIX}golden.{pid}"]
    assert _is_complete_image(images / "golden")


@pytest.mark.parametrize("length", [250, 255])
def test_a_long_image_name_stores_with_its_metadata(images, src, length):
    name = "n" * length
    meta = _store(images, src, name, "tgz")
    assert meta["name"] == name
    store = ImageStore(str(images))
    assert store.metadata(name)[digest.preferred()] == meta[digest.preferred()]
    assert sorted(os.listdir(images)) == [".vmim", name]
    _store(images, src, name, "rsync")  # over it, in another format
    assert os.path.isdir(images / name) and store.metadata(name)["format"] == "rsync"


def test_a_long_multibyte_name_stores(images, src):
    name = "é" * 127  # 254 bytes
    _store(images, src, name, "tgz")
    assert ImageStore(str(images)).metadata(name)["format"] == "tgz"


def test_names_longer_than_a_file_name_are_refused():
    with pytest.raises(UsageError) as exc:
        validate_name("n" * 256)
    assert exc.value.exit_code == 2
    assert "255" in str(exc.value)
    with pytest.raises(UsageError):
        validate_name("é" * 128)  # 256 bytes


def test_a_store_whose_metadata_cannot_be_written_still_succeeds(images, src, caplog):
    (images / ".vmim").write_text("not a directory")
    meta = _store(images, src, "golden", "tgz")
    assert meta["name"] == "golden"
    assert _is_complete_image(images / "golden")
    assert "metadata" in caplog.text and "full read" in caplog.text


def test_a_tree_store_beside_its_previous_tree_cannot_write_the_recorded_digests(images, src,
                                                                                 monkeypatch):
    """rsync --link-dest sees the whole store (a hard link needs one mount): the metadata
    directory, whose digests prove the other images without a full read, is bound read-only
    over it. What a compromised rsync would do there is done by a shell in its sandbox."""
    from vmim import process as process_mod

    _store(images, src, "golden", "rsync")
    _store(images, src, "other", "tgz")
    before = (images / META_DIR / "other.json").read_bytes()
    real_run = process_mod.run
    tried = []

    def and_forge(argv, *args, **kwargs):
        if any(str(a).startswith("--link-dest=") for a in argv):
            cut = len(argv) - argv[::-1].index("--")
            forge = [*argv[:cut], "/bin/sh", "-c",
                     "echo forged > /store/.vmim/other.json"]
            try:
                real_run(forge)
                tried.append("written")
            except CommandError as exc:
                tried.append(exc.stderr_tail)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(process_mod, "run", and_forge)
    _store(images, src, "golden", "rsync")
    assert len(tried) == 1 and "Read-only file system" in tried[0], tried
    assert (images / META_DIR / "other.json").read_bytes() == before


def test_a_previous_tree_that_cannot_be_removed_leaves_the_new_entry_stored_and_described(
        images, src, monkeypatch, caplog):
    """After the swap the previous tree, set aside, is removed; when that fails (or the run is
    killed there) the store has succeeded: the new entry and its own metadata are in place,
    and what is left is debris the next store removes."""
    from vmim import process as process_mod
    from vmim.sandbox import shown

    _store(images, src, "golden", "rsync")
    (src / "new").write_text("second\n")
    real_run = process_mod.run

    def rm_fails(argv, *args, **kwargs):
        if shown(argv)[0] == "rm":
            assert argv[0] != "rm"  # in the sandbox (store._remove), as all guest data is
            raise CommandError(list(argv), 1, "rm: cannot remove: Input/output error")
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(process_mod, "run", rm_fails)
    meta = _store(images, src, "golden", "rsync")
    assert (images / "golden" / "new").read_text() == "second\n"
    stored = json.loads((images / META_DIR / "golden.json").read_text())
    assert stored["size"] == meta["size"] and stored["mtime_ns"] == meta["mtime_ns"]
    assert "could not be removed yet" in caplog.text
    # what is left is this run's work directory, debris by its name (clean_debris, once this
    # process has ended), holding the previous tree
    left = [n for n in os.listdir(images) if n.startswith(TMP_PREFIX)]
    assert left == [f"{TMP_PREFIX}golden.{os.getpid()}"]
    assert not (images / left[0] / "golden" / "new").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     CommandError(["rsync"], 11, "Broken pipe (32)")])
def test_a_store_that_runs_out_of_space_says_the_store_is_full(images, src, monkeypatch,
                                                               failure):
    """ENOSPC, or a writer that only says 'broken pipe' on a store whose filesystem is full."""
    _store(images, src, "golden", "tgz")
    before = sorted(os.listdir(images)), (images / "golden").read_bytes()

    def failing(tmp, _link):
        open(tmp, "wb").close()
        raise failure

    class Full:  # what statvfs says of a full filesystem
        f_bfree, f_frsize, f_files, f_ffree = 0, 4096, 100, 50

    monkeypatch.setattr(os, "statvfs", lambda _d: Full())
    with pytest.raises(StoreFullError) as err:
        ImageStore(str(images)).write("golden", for_name("tgz"), failing, {})
    assert err.value.exit_code == 6
    assert f"image store {images} is full" in str(err.value)
    assert "the previous image 'golden' is kept" in str(err.value)
    assert (sorted(os.listdir(images)), (images / "golden").read_bytes()) == before


def test_a_store_failing_with_room_to_spare_is_not_called_full(images, src):
    def failing(tmp, _link):
        raise CommandError(["tar"], 2, "Cannot stat: Permission denied")

    with pytest.raises(CommandError) as err:
        ImageStore(str(images)).write("golden", for_name("tgz"), failing, {})
    assert not isinstance(err.value, StoreFullError) and "full" not in str(err.value)


# ------------------------------------------------------------ a tree out of other users' reach

#: run as user nobody: which of the paths (JSON on stdin) it can lstat
REACHED = ("import json, os, sys\n"
           "def reached(p):\n"
           "    try:\n"
           "        os.lstat(p)\n"
           "        return True\n"
           "    except OSError:\n"
           "        return False\n"
           "print(json.dumps([p for p in json.load(sys.stdin) if reached(p)]))\n")


@pytest.fixture
def public_images():
    """A store directory every user may search, as a store made with the default umask is
    (pytest's tmp_path is root's only)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("root and setpriv (util-linux) are needed to look as another user")
    top = tempfile.mkdtemp(prefix="vmim-test-store-")
    os.chmod(top, 0o755)
    yield pathlib.Path(top)
    shutil.rmtree(top)


def _reached_by_nobody(images, looked=None):
    """What user nobody can lstat below the store's entries (their contents: the setuid
    programs and device nodes of a guest), its metadata aside; looked gets what was tried."""
    below = [os.path.join(d, n) for top in os.listdir(images) if top != META_DIR
             for d, dirs, files in os.walk(images / top) for n in dirs + files]
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                          "/usr/bin/python3", "-c", REACHED], input=json.dumps(below),
                         capture_output=True, text=True, check=True)
    if looked is not None:
        looked.extend(below)
    return json.loads(res.stdout)


def test_no_other_user_reaches_into_a_tree_while_it_is_stored(public_images, src,
                                                              monkeypatch):
    """The tree's top was closed (0700) only after rsync had written all of it, in a directory
    made with the default mode: while a store ran, any local user entered the half-written tree
    and reached the guest's setuid programs and 0666 device nodes. Looked at after every
    command the store runs (rsync, sync, rm), a first store and one replacing it."""
    seen, looked = [], []
    real_run = process.run

    def run_then_look(argv, *args, **kwargs):
        result = real_run(argv, *args, **kwargs)
        seen.extend(_reached_by_nobody(public_images, looked))
        return result

    monkeypatch.setattr(process, "run", run_then_look)
    for _ in range(2):
        _store(public_images, src, "golden", "rsync")
        assert _is_complete_image(public_images / "golden")
        seen.extend(_reached_by_nobody(public_images, looked))
    assert seen == []
    # the half-written tree was looked into: the new one beside the old one, before its rename
    assert len({p for p in looked if p.endswith("/etc/hostname")}) >= 2


#: in a mount namespace of its own, a ramfs (which keeps no trusted.* xattrs) as the store: a
#: tree stored there, then mirrored to a target of another mode; prints what came of it
ON_RAMFS = textwrap.dedent("""
    import functools, json, logging, os, subprocess, sys
    from vmim import store
    from vmim.archive import for_name
    src, images, target = sys.argv[1:]
    subprocess.run(["mount", "-t", "ramfs", "ramfs", images], check=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fmt = for_name("rsync")
    store.ImageStore(images).write("golden", fmt, functools.partial(fmt.write, src, ["."]), {})
    tree = os.path.join(images, "golden")
    stored = os.stat(tree).st_mode & 0o7777
    fmt.mirror(tree, target)
    print(json.dumps([stored, os.listxattr(tree), os.stat(target).st_mode & 0o7777]))
""")


def test_a_tree_on_a_store_without_trusted_xattrs_keeps_its_mode_and_says_so(public_images,
                                                                             src, tmp_path):
    """A store that keeps no trusted.* xattrs (NFS; here a ramfs) cannot keep the guest
    root's mode beside a closed top: the tree keeps that mode (open), the store says so, and a
    restore from it gives the slot's root that mode (rsync carries it)."""
    os.chmod(src, 0o751)
    target = tmp_path / "slot"
    target.mkdir(mode=0o700)
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", ON_RAMFS, str(src), str(public_images), str(target)],
                         capture_output=True, text=True, env={**os.environ,
                                                              "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [0o751, [], 0o751]
    assert "stays open to other users (mode 751)" in res.stderr
    assert "keep the store closed (mode 0700)" in res.stderr
    assert not os.listdir(public_images)  # the ramfs went with its namespace


@pytest.mark.parametrize("older", [False, True])
def test_a_restore_or_insert_from_a_tree_gives_the_guest_root_its_mode(images, src, tmp_path,
                                                                       older):
    """A tree's top is closed (0700), the guest root's mode kept in its xattr; a tree of an
    older release has no such xattr and an open top, which is the guest root's mode. A restore
    (mirror) and an insert (unpack) from either give the target the guest root's mode."""
    if os.geteuid() != 0:
        pytest.skip("trusted.* xattrs are root's to write")
    os.chmod(src, 0o751)
    _store(images, src, "golden", "rsync")
    tree = images / "golden"
    assert os.stat(tree).st_mode & 0o7777 == 0o700
    if older:
        os.removexattr(tree, ROOT_MODE)
        os.chmod(tree, 0o751)
    fmt = for_name("rsync")
    for i, copy in enumerate((fmt.mirror, fmt.unpack)):
        target = tmp_path / f"slot{i}"
        target.mkdir(mode=0o700)
        copy(str(tree), str(target))
        assert os.stat(target).st_mode & 0o7777 == 0o751
        assert (target / "etc" / "hostname").read_text() == "guest\n"


def test_a_user_who_cannot_enter_a_tree_is_listed_the_size_it_was_stored_with(public_images,
                                                                               src):
    """-L as another user than root: a tree's top is root's only (0700), so summing its files
    found none, and SIZE said 0; the size recorded when it was stored is what is listed."""
    images = public_images / "images"
    images.mkdir(mode=0o755)
    meta = _store(images, src, "golden", "rsync")
    assert meta["size"] == len("guest\n")
    cfg = public_images / "vmim.cfg"
    cfg.write_text(f'[vmim.local]\nvmimages = "{images}"\n')
    res = as_user([sys.executable, "-m", "vmim", "--config", str(cfg), "-L", "--json"], "/")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(res.stdout)["images"]
    assert (entry["name"], entry["format"], entry["size"]) == ("golden", "rsync", meta["size"])


@pytest.mark.parametrize("fmt_name", ["tgz", "tar.zst", "cpio.bz2"])
def test_an_image_proven_by_its_recorded_digest_is_not_detected_again(images, src, fmt_name,
                                                                       monkeypatch):
    """The digest this tool recorded proves the bytes it wrote in the format it recorded:
    libmagic is not asked (a restore's fixed cost); a byte changed, and it is asked, and the
    image is refused as corrupt, the slot untouched."""
    from vmim.errors import StateError
    from vmim.steps import proof

    for tool in for_name(fmt_name).unpack_tools():
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make test installs it)")
    _store(images, src, "golden", fmt_name)
    store = ImageStore(str(images))
    asked = []
    real_detect = detect.detect
    monkeypatch.setattr(detect, "detect", lambda path: asked.append(path) or real_detect(path))
    proven = proof.prove(store, "golden")
    assert proven.fmt.name == fmt_name and proven.summary is None and asked == []
    with open(images / "golden", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(StateError, match="corrupt"):
        proof.prove(store, "golden")
    assert asked == [str(images / "golden")]


def test_an_image_checked_beside_the_mount_is_proven_before_anything_changes(images, src):
    """prove(later=True) gives the image with its digest check still running; confirm()
    waits for it, and a byte changed fails it as corrupt (exit 4)."""
    from types import SimpleNamespace

    from vmim.errors import StateError
    from vmim.steps import proof

    _store(images, src, "golden", "tar.zst")
    store = ImageStore(str(images))
    box = SimpleNamespace(proven={}, req=SimpleNamespace(restore="golden", inserts=()),
                          store=lambda kind: store)
    box.proven[("image", 0)] = proof.prove(store, "golden", later=True)
    assert box.proven[("image", 0)].check is not None
    proof.confirm(box)
    assert box.proven[("image", 0)].check is None
    assert box.proven[("image", 0)].fmt.name == "tar.zst"
    st = os.stat(images / "golden")
    with open(images / "golden", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    os.utime(images / "golden", ns=(st.st_atime_ns, st.st_mtime_ns))  # only the bytes differ
    box.proven[("image", 0)] = proof.prove(store, "golden", later=True)
    assert box.proven[("image", 0)].check is not None
    with pytest.raises(StateError, match="digest differs|corrupt"):
        proof.confirm(box)


@pytest.mark.parametrize("link", ["../atree/etc", "/store/atree/etc"])
def test_a_tree_store_never_links_another_images_file_through_a_guest_symlink(images, tmp_path,
                                                                             link):
    """rsync --link-dest follows the directories on the way to a candidate in the previous
    tree, and links it when size, mtime, mode and owner match, without reading it: a guest
    whose previous tree held `etc -> ../atree/etc` got atree's /etc/passwd into its own image
    (an attack of 2026-12-07). The other entries of the store are hidden from its sandbox."""
    a = tmp_path / "a"
    (a / "etc").mkdir(parents=True)
    (a / "etc" / "passwd").write_text("guestpw\n")
    os.utime(a / "etc" / "passwd", (1_600_000_000, 1_600_000_000))
    _store(images, a, "atree", "rsync")
    b = tmp_path / "b"
    b.mkdir()
    os.symlink(link, b / "etc")
    _store(images, b, "bevil", "rsync")
    os.unlink(b / "etc")
    (b / "etc").mkdir()
    (b / "etc" / "passwd").write_text("ATTACK\n\n")  # the same size, mode, owner and mtime
    os.utime(b / "etc" / "passwd", (1_600_000_000, 1_600_000_000))
    _store(images, b, "bevil", "rsync")
    assert (images / "bevil" / "etc" / "passwd").read_text() == "ATTACK\n\n"
    assert (images / "atree" / "etc" / "passwd").stat().st_nlink == 1


@pytest.mark.parametrize("text", ["[" * 200_000, "[1, 2]", '"x"', "{"])
def test_metadata_that_is_not_an_object_describes_nothing(images, src, text):
    """Nested deeper than the decoder goes (RecursionError, not a ValueError), or not an
    object: the entry is as if it had no metadata (proven by a full read), not a crash."""
    _store(images, src, "golden", "tgz")
    (images / META_DIR / "golden.json").write_text(text)
    assert ImageStore(str(images)).metadata("golden") is None


def test_an_image_replaced_while_its_restore_prepared_stops_the_run(images, src):
    """The check read another file than the one the restore prepared for (stored again under
    the same name meanwhile): that file proves, but what was prepared does not hold for it."""
    import dataclasses
    from types import SimpleNamespace

    from vmim.errors import StateError
    from vmim.steps import proof

    _store(images, src, "golden", "tar.zst")
    store = ImageStore(str(images))
    box = SimpleNamespace(proven={}, req=SimpleNamespace(restore="golden", inserts=()),
                          store=lambda kind: store)
    pending = proof.prove(store, "golden", later=True)
    pending.check.cancel()
    other = digest.Check(pending.path, digest.preferred(), "0" * 64)  # the digest of another
    box.proven[("image", 0)] = dataclasses.replace(pending, check=other)
    with pytest.raises(StateError, match="changed while the run prepared its restore"):
        proof.confirm(box)


def test_a_signal_while_waiting_for_the_check_leaves_it_to_be_called_off(images, src,
                                                                         monkeypatch):
    """Interrupted inside the wait: the check stays on the box, and the end of the run
    (Box.call_off_checks) stops its thread."""
    from types import SimpleNamespace

    from vmim.errors import Interrupted
    from vmim.steps import Box, proof

    _store(images, src, "golden", "tar.zst")
    store = ImageStore(str(images))
    box = Box(None, "web1", None, SimpleNamespace(restore="golden", inserts=()))
    box.proven[("image", 0)] = proof.prove(store, "golden", later=True)
    check = box.proven[("image", 0)].check

    def interrupted(self):
        raise Interrupted(15)
    monkeypatch.setattr(digest.Check, "matches", interrupted)
    with pytest.raises(Interrupted):
        proof.confirm(box)
    assert box.proven[("image", 0)].check is check
    box.call_off_checks()
    check._thread.join(5)
    assert not check._thread.is_alive()
