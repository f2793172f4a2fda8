"""The image store without root: atomic replacement, debris of killed runs, names, metadata."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
import textwrap

import pytest

from vmim import digest
from vmim.archive import detect, for_name
from vmim.errors import CommandError, UsageError
from vmim.store import OLD_PREFIX, TMP_PREFIX, ImageStore, StoreFullError, validate_name


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
