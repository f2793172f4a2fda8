"""Format detection by content: real archives made by the real tools, misleading names."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmim.archive import detect


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them)")


def sh(argv, **kw):
    subprocess.run(argv, check=True, **kw)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("guest\n")
    (src / "bin").mkdir()
    (src / "bin" / "sh").write_bytes(b"\x7fELF" + bytes(5000))
    return src


def make_archive(tree, out, container, compressor):
    """container 'tar' or 'cpio', compressor an argv (or None), written to out."""
    if container == "tar":
        stream = subprocess.run(["tar", "-C", str(tree), "-cf", "-", "."], check=True,
                                capture_output=True).stdout
    else:
        names = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
        stream = subprocess.run(["cpio", "-o", "-Hnewc", "--quiet"], cwd=tree, input=names,
                                check=True, capture_output=True).stdout
    if compressor:
        stream = subprocess.run(compressor, input=stream, check=True, capture_output=True).stdout
    out.write_bytes(stream)


CASES = [
    # (container, compressor argv, expected format)
    ("tar", ["gzip", "-c"], "tgz"),
    ("tar", ["pigz", "-c"], "tgz"),
    ("cpio", ["bzip2", "-c"], "cpio.bz2"),
    ("cpio", ["lbzip2", "-c"], "cpio.bz2"),
    ("tar", ["zstd", "-q", "-T0", "-c"], "tar.zst"),
    ("tar", ["bzip2", "-c"], "tar.bz2"),
    ("cpio", ["gzip", "-c"], "cpio.gz"),
    ("tar", ["xz", "-c"], "tar.xz"),
    ("tar", None, "tar"),
    ("cpio", None, "cpio"),
]


@pytest.mark.parametrize("container,compressor,expected", CASES,
                         ids=[c[2] + ("-" + c[1][0] if c[1] else "") for c in CASES])
def test_archives_are_detected_by_content_not_name(tmp_path, tree, container, compressor, expected):
    need(container, *(compressor[:1] if compressor else []))
    # The name says the opposite of what the content is.
    out = tmp_path / ("golden.cpio.bz2" if container == "tar" else "golden.tar.gz")
    make_archive(tree, out, container, compressor)
    found = detect.detect(str(out))
    assert found.format == expected
    assert found.container == container
    # a digest-proven image of this tool is taken for what its recorded format name says:
    # the same as what libmagic finds in it
    recorded = detect.recorded(found.format)
    assert (recorded.format, recorded.container, recorded.compression) == \
        (found.format, found.container, found.compression)


@pytest.mark.parametrize("name", ["rsync", "qcow2", "raw", "unknown", "tar.gz", "cpio.zst.x",
                                  "tgz.gz", "zip", "", None, 3, "tar.", ".gz"])
def test_a_recorded_format_name_it_does_not_write_is_detected_instead(name):
    assert detect.recorded(name) is None


def test_directory_is_an_rsync_tree(tree):
    assert detect.detect(str(tree)).format == "rsync"


def test_symlink_to_an_image_is_followed(tmp_path, tree):
    need("tar", "gzip")
    target = tmp_path / "real"
    make_archive(tree, target, "tar", ["gzip", "-c"])
    (tmp_path / "alias").symlink_to(target)
    assert detect.detect(str(tmp_path / "alias")).format == "tgz"


def test_qcow2_disk_image(tmp_path):
    need("qemu-img")
    img = tmp_path / "golden.tgz"
    sh(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"])
    assert detect.detect(str(img)).format == "qcow2"


def test_qemu_s_old_qcow_v1_is_not_qcow2(tmp_path):
    need("qemu-img")
    img = tmp_path / "old"
    sh(["qemu-img", "create", "-q", "-f", "qcow", str(img), "16M"])
    assert detect.detect(str(img)).format == "unknown"


def test_raw_disk_with_partition_table(tmp_path):
    need("sfdisk")
    img = tmp_path / "disk"
    with open(img, "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    sh(["sfdisk", "-q", str(img)], input=b"label: dos\n,,L\n")
    assert detect.detect(str(img)).format == "raw"


@pytest.mark.parametrize("content", [b"", b"just some text\n", b"\x1f\x8b\x08\x00garbage-not-gzip" * 10,
                                     b"BZh91AY&SY" + b"\x00" * 64, b"\x28\xb5\x2f\xfd" + b"\xff" * 64])
def test_unrecognised_or_corrupt_files_are_unknown(tmp_path, content):
    need("zstd")
    f = tmp_path / "image.tgz"
    f.write_bytes(content)
    found = detect.detect(str(f))
    assert found.format == "unknown"
    assert not found.known


def test_compressed_file_that_is_neither_tar_nor_cpio_is_unknown(tmp_path):
    f = tmp_path / "notes"
    f.write_bytes(subprocess.run(["gzip", "-c"], input=b"hello world\n" * 100,
                                 capture_output=True, check=True).stdout)
    found = detect.detect(str(f))
    assert found.format == "unknown" and found.compression == "gzip"


def test_truncated_gzip_tar_is_still_named_by_its_head(tmp_path, tree):
    """A truncated archive is a tgz by content; its corruption is found on restore, not here."""
    big = tree / "big"
    big.write_bytes(bytes(range(256)) * 4096)
    f = tmp_path / "t"
    make_archive(tree, f, "tar", ["gzip", "-c"])
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert detect.detect(str(f)).format == "tgz"


def test_filesystem_image_is_raw(tmp_path):
    need("mkfs.ext4")
    img = tmp_path / "fs.img"
    with open(img, "wb") as fh:
        fh.truncate(8 * 1024 * 1024)
    sh(["mkfs.ext4", "-q", str(img)])
    assert detect.detect(str(img)).format == "raw"
