"""md5 checks, offline downloads (file:// URLs) and archive extraction safety."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from metamtl.data import check_integrity, download_url, md5sum, safe_extract, verify_md5
from metamtl.errors import DataError, IntegrityError

SMALL1 = "images_background_small1.zip"
MD5 = "e704a628b5459e08445c13499850abc4"


def test_md5sum_and_integrity(omniglot_root, tmp_path):
    path = omniglot_root / SMALL1
    assert md5sum(path) == MD5
    assert check_integrity(path, MD5) and check_integrity(path) and check_integrity(path, MD5.upper())
    assert not check_integrity(path, "0" * 32) and not check_integrity(tmp_path / "missing.zip")
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"abc")
    assert md5sum(copy) == "900150983cd24fb0d6963f7d28e17f72"
    copy.write_bytes(b"abcd")  # the per-process memo must notice the change
    assert md5sum(copy) == "e2fc714c4727ee9395f324cd2e7f331f"
    with pytest.raises(IntegrityError, match="copy.bin.*expected 0{32}, got e2fc"):
        verify_md5(copy, "0" * 32)


def test_download_url_from_file_url(omniglot_root, tmp_path):
    url = (omniglot_root / SMALL1).as_uri()
    path = download_url(url, tmp_path / "dl", md5=MD5)
    assert path == tmp_path / "dl" / SMALL1 and md5sum(path) == MD5
    mtime = path.stat().st_mtime_ns
    assert download_url(url, tmp_path / "dl", md5=MD5) == path and path.stat().st_mtime_ns == mtime
    named = download_url(url, tmp_path / "dl", filename="renamed.zip")
    assert named.read_bytes() == path.read_bytes()


def test_download_url_with_wrong_md5_leaves_nothing(omniglot_root, tmp_path):
    with pytest.raises(IntegrityError) as err:
        download_url((omniglot_root / SMALL1).as_uri(), tmp_path, md5="0" * 32)
    assert MD5 in str(err.value) and "0" * 32 in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_url_failure_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        download_url((tmp_path / "absent.zip").as_uri(), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def serve_once(reply: bytes) -> str:
    """A loopback (127.0.0.1) server that answers one request with ``reply`` and closes: an
    ``http://`` URL for it (a dropped connection, a non-HTTP port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply)
        server.close()

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/f.bin"


def test_download_url_truncated_without_md5_is_a_data_error_and_saves_nothing(tmp_path):
    """The connection dropped after 500 of the 1000 bytes of Content-Length: the half file was saved
    under the final name (and never downloaded again) when no md5 was given."""
    url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)
    with pytest.raises(DataError, match=r"incomplete: got 500 of 1000 bytes"):
        download_url(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 300,  # IncompleteRead
    b"SSH-2.0-OpenSSH_9.6\r\n",  # BadStatusLine: not an HTTP server
], ids=["truncated-chunked", "not-http"])
def test_download_url_http_protocol_errors_are_data_errors(reply, tmp_path):
    """http.client's IncompleteRead and BadStatusLine escaped download_url as they were."""
    with pytest.raises(DataError, match="could not download"):
        download_url(serve_once(reply), tmp_path, md5=hashlib.md5(b"x" * 1000).hexdigest())
    assert list(tmp_path.iterdir()) == []


# -- safe_extract --------------------------------------------------------------------------------


def make_zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] = {}) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, files: list[str], symlinks: dict[str, str] = {}, hardlinks: dict[str, str] = {}) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name in files:
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"ok"))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
    return path


def test_safe_extract_extracts_good_archives(tmp_path):
    z = make_zip(tmp_path / "good.zip", [("top/a.txt", b"ok")], {"top/link": "a.txt"})
    safe_extract(z, tmp_path / "z")
    assert (tmp_path / "z" / "top" / "a.txt").read_bytes() == b"ok"
    assert os.readlink(tmp_path / "z" / "top" / "link") == "a.txt"
    t = make_tar(tmp_path / "good.tar.gz", ["top/a.txt"], {"top/link": "a.txt"}, {"top/hard": "top/a.txt"})
    safe_extract(t, tmp_path / "t")
    assert (tmp_path / "t" / "top" / "link").read_bytes() == b"ok"
    assert (tmp_path / "t" / "top" / "hard").read_bytes() == b"ok"


@pytest.mark.parametrize(
    "kind, members, symlinks, hardlinks, why",
    [
        ("zip", ["ok.txt", "/abs/evil.txt"], {}, {}, "absolute path"),
        ("zip", ["ok.txt", "a/../../evil.txt"], {}, {}, "'..'"),
        ("zip", ["ok.txt"], {"a/link": "../../etc"}, {}, "outside the target"),
        ("zip", ["ok.txt"], {"link": "/etc/passwd"}, {}, "absolute path"),
        ("tar", ["ok.txt", "/abs/evil.txt"], {}, {}, "absolute path"),
        ("tar", ["ok.txt", "../evil.txt"], {}, {}, "'..'"),
        ("tar", ["ok.txt"], {"a/b/link": "../../../x"}, {}, "outside the target"),
        ("tar", ["ok.txt"], {"link": "/etc"}, {}, "absolute path"),
        ("tar", ["ok.txt"], {}, {"hard": "../outside"}, "outside the target"),
    ],
)
def test_safe_extract_refuses_escaping_members_and_writes_nothing(kind, members, symlinks, hardlinks, why, tmp_path):
    if kind == "zip":
        archive = make_zip(tmp_path / "bad.zip", [(m, b"x") for m in members], symlinks)
    else:
        archive = make_tar(tmp_path / "bad.tar.gz", members, symlinks, hardlinks)
    bad = next(iter([*symlinks, *hardlinks] or [members[-1]]))
    with pytest.raises(IntegrityError, match=why) as err:
        safe_extract(archive, tmp_path / "target")
    assert repr(bad) in str(err.value)
    assert not (tmp_path / "target").exists()


def test_safe_extract_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"neither zip nor tar")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        safe_extract(tmp_path / "x.bin", tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True])
def test_safe_extract_damaged_zip_member_is_an_integrity_error_and_writes_nothing(existing, tmp_path):
    archive = make_zip(tmp_path / "bad.zip", [("a/one.txt", b"hello world " * 10), ("a/two.txt", b"second " * 10)])
    data = archive.read_bytes()
    archive.write_bytes(data.replace(b"second", b"Second", 1))  # member 2's data no longer matches its CRC
    target = tmp_path / "out"
    if existing:
        (target / "a").mkdir(parents=True)
        (target / "a" / "kept.txt").write_bytes(b"kept")
    with pytest.raises(IntegrityError, match="bad.zip"):
        safe_extract(archive, target)
    left = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [Path("bad.zip")] + ([Path("out/a/kept.txt")] if existing else [])


@pytest.mark.parametrize("mode, ext", [("w", "tar"), ("w:gz", "tar.gz")])
def test_safe_extract_truncated_tar_is_an_integrity_error(mode, ext, tmp_path):
    """A partial download of a tar / tar.gz: IntegrityError saying to download it again, nothing written."""
    good = tmp_path / f"good.{ext}"
    with tarfile.open(good, mode) as tf:
        for i in range(5):
            data = os.urandom(5000)
            info = tarfile.TarInfo(f"d/{i}.bin")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    part = tmp_path / f"partial.{ext}"
    part.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="corrupt or incomplete.*download it again"):
        safe_extract(part, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["good." + ext, part.name]


def test_bad_destinations_are_data_errors_before_any_work(tmp_path):
    """A download root or extraction target that is a file, or a final name that is a folder:
    DataError naming the path, and nothing extracted."""
    archive = make_zip(tmp_path / "a.zip", [("x", b"y")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        download_url(archive.as_uri(), tmp_path / "file")
    with pytest.raises(DataError, match="is not a folder"):
        download_url(archive.as_uri(), tmp_path / "file" / "sub")
    (tmp_path / "root" / "a.zip").mkdir(parents=True)
    with pytest.raises(DataError, match="a folder has that name"):
        download_url(archive.as_uri(), tmp_path / "root")
    with pytest.raises(DataError, match="is not a folder"):
        safe_extract(archive, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "file", "root"]


def test_safe_extract_kind_conflict_with_the_target_changes_nothing(tmp_path):
    """An archive file where the target holds a folder: DataError naming it, before any file of
    the target is replaced (the merge is all-or-nothing)."""
    archive = make_zip(tmp_path / "v2.zip", [(f"data/{n}.txt", b"version2") for n in "abcdefgh"])
    target = tmp_path / "target"
    (target / "data").mkdir(parents=True)
    for n in "abcdfgh":
        (target / "data" / f"{n}.txt").write_bytes(b"version1")
    (target / "data" / "e.txt").mkdir()
    with pytest.raises(DataError, match=r"e\.txt is a folder but the archive holds a file"):
        safe_extract(archive, target)
    assert {p.name: p.read_bytes() for p in (target / "data").iterdir() if p.is_file()} == {
        f"{n}.txt": b"version1" for n in "abcdfgh"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target", "v2.zip"]


def test_safe_extract_into_a_symlinked_folder_is_checked_like_the_folder(tmp_path):
    """A target given as a link to a folder skipped the up-front kind check (the clash was met while
    moving files: the folder was left partly updated); now it is refused before anything moves."""
    real = tmp_path / "real"
    (real / "b").mkdir(parents=True)
    (real / "b" / "keep.txt").write_text("x")
    os.symlink(real, tmp_path / "link")
    archive = make_zip(tmp_path / "a.zip", [*((f"f{i}.txt", b"new") for i in range(20)), ("b", b"a file")])
    with pytest.raises(DataError, match=r"b is a folder but the archive holds a file.*nothing was changed"):
        safe_extract(archive, tmp_path / "link")
    assert sorted(p.name for p in real.iterdir()) == ["b"]
    good = make_zip(tmp_path / "g.zip", [("x/1.txt", b"1")])
    assert safe_extract(good, tmp_path / "link") == tmp_path / "link"
    assert (real / "x" / "1.txt").read_bytes() == b"1" and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "g.zip", "link", "real"]
    assert sorted(p.name for p in real.iterdir()) == ["b", "x"]


def test_safe_extract_into_a_folder_on_another_file_system(tmp_path):
    """A link to (or a mount point at) a folder on another file system: the staging folder was made
    beside the link, so every extraction failed with EXDEV (invalid cross-device link)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another file system than the temporary folder")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        os.symlink(other, tmp_path / "data")
        safe_extract(make_zip(tmp_path / "b.zip", [("x/1.txt", b"1")]), tmp_path / "data")
        assert (other / "x" / "1.txt").read_bytes() == b"1" and sorted(p.name for p in other.iterdir()) == ["x"]
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_safe_extract_clashing_members_are_an_integrity_error(kind, tmp_path):
    """A malformed archive holding a file ``a`` and a member ``a/b``: IntegrityError, nothing written."""
    if kind == "zip":
        archive = make_zip(tmp_path / "c.zip", [("a", b"x"), ("a/b", b"y")])
    else:
        archive = make_tar(tmp_path / "c.tar.gz", ["a", "a/b"])
    with pytest.raises(IntegrityError, match="clash"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_download_url_percent_decodes_the_file_name(tmp_path):
    """``my%20file.zip`` is saved as ``my file.zip``; a name that decodes to a path is refused."""
    archive = make_zip(tmp_path / "my file.zip", [("x", b"y")])
    assert archive.as_uri().endswith("my%20file.zip")
    assert download_url(archive.as_uri(), tmp_path / "dl") == tmp_path / "dl" / "my file.zip"
    with pytest.raises(DataError, match="safe file name"):
        download_url(archive.as_uri().replace("my%20file.zip", "a%2F..%2Fb"), tmp_path / "dl2")
