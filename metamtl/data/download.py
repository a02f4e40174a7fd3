"""Checksums, downloads and safe archive extraction.

* :func:`md5sum` / :func:`check_integrity` / :func:`verify_md5` - file checksums.
* :func:`download_url` - fetch a URL into a folder through a temporary file, verifying the md5
  before the file takes its final name (so a file with the final name is always complete).
* :func:`safe_extract` - extract a zip or tar archive, refusing up front any member that would
  land outside the target folder (absolute paths, ``..`` components, escaping links).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from ..errors import DataError, DataNotFoundError, IntegrityError, MetamtlError
from ..files import atomic_write
from ..progress_bars import progress_bar

_CHUNK = 1 << 20
_MD5_MEMO: dict[tuple, str] = {}


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 digest of a file.

    Results are memoised per process by ``(path, size, mtime, ctime, inode)``, so checking a large
    archive again (e.g. when a dataset is constructed twice) does not read it again; any write to
    the file changes its ctime and invalidates the memo.
    """
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _MD5_MEMO:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _MD5_MEMO[key] = h.hexdigest()
    return _MD5_MEMO[key]


def check_integrity(path: str | os.PathLike, md5: str | None = None) -> bool:
    """True if ``path`` is a file and (when ``md5`` is given) its md5 matches."""
    return os.path.isfile(path) and (md5 is None or md5sum(path) == md5.lower())


def verify_md5(path: str | os.PathLike, md5: str) -> None:
    """Raise :class:`IntegrityError` naming the file and both digests if ``path``'s md5 differs."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{path} does not exist")
    actual = md5sum(path)
    if actual != md5.lower():
        raise IntegrityError(
            f"{path}: md5 mismatch (expected {md5.lower()}, got {actual}); the file is corrupt or "
            "incomplete: delete it and download it again"
        )


def download_url(
    url: str, root: str | os.PathLike, filename: str | None = None, md5: str | None = None
) -> Path:
    """Download ``url`` to ``root/filename`` and return that path.

    Args:
        url: any URL urllib can open (``https://``, ``file://``, ...).
        root: folder to save into (created if missing).
        filename: name of the saved file (default: the last component of the URL's path,
            percent-decoded: ``my%20file.zip`` is saved as ``my file.zip``).
        md5: expected md5 of the file; checked before the file is renamed to its final name.

    If ``root/filename`` already exists with the right md5 (or no md5 is given) nothing is
    downloaded.  The data is written to a temporary file in ``root``, fsynced, verified (its size
    against the server's ``Content-Length`` when it sends one, and its md5), then atomically
    renamed, so an interrupted or corrupt download never leaves a file under the final name.  Raises :class:`IntegrityError` on an md5 mismatch and :class:`DataError` when the URL
    cannot be fetched.
    """
    root = Path(root).expanduser()
    filename = filename or urllib.parse.unquote(posixpath.basename(urllib.parse.urlparse(url).path))
    if not filename or filename in (".", "..") or any(c in filename for c in "/\\\0"):
        raise DataError(f"cannot tell a safe file name from the URL {url!r} (got {filename!r}); pass filename=")
    final = root / filename
    _check_destination(root, final, "download to")
    if check_integrity(final, md5):
        return final
    def fill(out) -> None:  # streams the download; size and md5 are checked before the file gets its name
        h, got, size = hashlib.md5(), 0, None
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                size = _content_length(response)
                with progress_bar(None, total=size, unit="B", unit_scale=True, desc=filename, leave=False) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise DataError(
                f"could not download {url}: {exc}. Check the connection, or download the "
                f"file by hand and save it as {final}"
            ) from exc
        if size is not None and got != size:  # http.client ends a dropped connection's body quietly
            raise DataError(f"could not download {url}: the download is incomplete: got {got} of {size} bytes "
                            f"(the connection dropped); nothing was saved to {final} - retry, or fetch it by hand")
        if md5 is not None and h.hexdigest() != md5.lower():
            raise IntegrityError(
                f"downloaded {url} but its md5 is {h.hexdigest()}, expected {md5.lower()}; "
                f"nothing was saved to {final} (retry, or fetch it by hand)"
            )

    try:
        atomic_write(final, fill)
    except MetamtlError:
        raise
    except OSError as exc:
        raise DataError(f"could not save {url} as {final}: {exc}; check that {root} is a writable "
                        "folder with free space") from exc
    return final


def _content_length(response) -> int | None:
    """The response's ``Content-Length`` in bytes, or ``None`` when it gives none (or a malformed one)."""
    size = (response.headers.get("Content-Length") or "").strip()
    return int(size) if size.isdigit() else None


def _check_destination(folder: Path, path: Path | None, what: str) -> None:
    """Refuse, before any work, a ``folder`` that exists but is not a folder, or (``path``) a
    destination file name that is a folder."""
    for parent in (folder, *folder.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DataError(f"cannot {what} {folder}: {parent} is not a folder; remove or rename it, "
                                "or choose another folder")
            break
    if path is not None and path.is_dir():
        raise DataError(f"cannot {what} {path}: a folder has that name; remove or rename it")


# -- extraction ---------------------------------------------------------------------------------


def _member_error(archive: Path, member: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"refusing to extract {archive}: member {member!r} {why}; the archive is unsafe or "
        "corrupt, nothing was extracted"
    )


def _check_member(archive: Path, name: str, link: str | None = None, hardlink: bool = False) -> None:
    """Refuse a member whose path, or link target, is absolute or leaves the archive's root."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise _member_error(archive, name, "has an absolute path")
    if ".." in norm.split("/"):
        raise _member_error(archive, name, "has a '..' path component")
    if link is None:
        return
    link = link.replace("\\", "/")
    if link.startswith("/") or (len(link) > 1 and link[1] == ":"):
        raise _member_error(archive, name, f"links to the absolute path {link!r}")
    # Symlink targets are relative to the link's folder, hard-link targets to the archive root.
    resolved = posixpath.normpath(link if hardlink else posixpath.join(posixpath.dirname(norm), link))
    if resolved == ".." or resolved.startswith("../"):
        raise _member_error(archive, name, f"links to {link!r}, outside the target folder")


def _resolve(path: str, links: dict[str, str]) -> list[str] | None:
    """Components of ``path`` (relative to the target) after following the archive's own
    symlinks, as the file system would once they exist; ``None`` if it leaves the target."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    parts: list[str] = []
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp == "..":
            if not parts:
                return None
            parts.pop()
            continue
        here = "/".join([*parts, comp])
        if here in links:
            hops += 1
            target = links[here]
            if hops > 40 or target.startswith("/"):
                return None
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        parts.append(comp)
    return parts


def _check_links(archive: Path, members: list[tuple[str, str | None, bool]]) -> None:
    """Refuse members that would land outside the target once the archive's symlinks exist.

    Path strings alone are not enough: with ``a -> .`` a member ``a/b -> ..`` looks contained
    but is created as ``b`` pointing to the target's parent.  Each member's path (and link
    target) is therefore resolved through the archive's symlinks (:func:`_resolve`).
    """
    links: dict[str, str] = {}
    for name, link, hardlink in members:
        norm = posixpath.normpath(name.replace("\\", "/")).strip("/")
        if link is not None and not hardlink:
            if norm in links:
                raise _member_error(archive, name, "is a symlink that appears twice")
            links[norm] = link.replace("\\", "/")
    for name, link, hardlink in members:
        norm = posixpath.normpath(name.replace("\\", "/")).strip("/")
        parent = _resolve(posixpath.dirname(norm), links)
        if parent is None:
            raise _member_error(archive, name, "lies under a symlink that points outside the target folder")
        if link is None:
            if _resolve(norm, links) is None:
                raise _member_error(archive, name, "is written through a symlink that points outside the target folder")
            continue
        start = "" if hardlink else "/".join(parent)
        if _resolve(posixpath.join(start, link.replace("\\", "/")), links) is None:
            raise _member_error(archive, name, f"links to {link!r}, outside the target folder (through other links)")


def _zip_symlink_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """The link target of a zip member stored as a symlink (Unix mode bits), else None."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return zf.read(info).decode("utf-8")
    return None


@contextlib.contextmanager
def _staged(archive: Path, target: Path, corrupt: tuple[type[BaseException], ...]):
    """Yield an empty staging folder on ``target``'s file system; on success merge it into ``target``.

    The staging folder is a hidden folder inside ``target`` when it exists (so a mount point, or a
    folder on another file system, works: entries are moved with ``os.replace``), else beside it.

    Whatever fails inside (``corrupt`` errors, and members that clash such as a file ``a`` and a
    member ``a/b``, become :class:`IntegrityError`), the staging folder is removed and ``target`` is
    left as it was: no partially extracted archive is ever visible.  An entry of the archive whose
    kind (file or folder) differs from what ``target`` already holds there is refused before
    anything is moved (:class:`DataError` naming it).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    where = target if target.is_dir() else target.parent
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=where))
    try:
        try:
            yield stage
        except corrupt as exc:  # damaged member data, FilterError and friends
            raise IntegrityError(f"refusing to extract {archive}: {exc}; nothing was extracted - "
                                 "check or download the archive again") from exc
        except OSError as exc:
            raise _write_error(archive, target, exc) from exc
        _check_merge(archive, stage, target)
        try:
            target.mkdir(exist_ok=True)
            _merge_into(stage, target)
        except OSError as exc:
            raise DataError(f"extracting {archive} into {target} failed midway: {exc}; {target} may be "
                            "partly updated - fix the cause and extract again") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_error(archive: Path, target: Path, exc: OSError) -> DataError:
    """The error for an OSError met while writing members into the private staging folder."""
    if exc.errno is None or exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return IntegrityError(f"refusing to extract {archive}: its members clash or its data is damaged "
                              f"({exc}), e.g. a path that is both a file and a folder; the archive is "
                              "malformed or corrupt, nothing was extracted - download it again")
    return DataError(f"could not extract {archive} next to {target}: {exc}; nothing was extracted - "
                     "check free space and permissions")


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _check_merge(archive: Path, src: Path, dest: Path) -> None:
    """Refuse, before anything is moved, an entry of ``src`` whose kind (folder, or file/link)
    differs from what ``dest`` already holds under that name."""
    if not _is_folder(dest):
        return
    for entry in src.iterdir():
        to = dest / entry.name
        if not (to.exists() or to.is_symlink()):
            continue
        if _is_folder(entry) != _is_folder(to):
            held, new = ("a folder", "a file") if _is_folder(to) else ("a file", "a folder")
            raise DataError(f"cannot extract {archive}: {to} is {held} but the "
                            f"archive holds {new} there; move or delete {to} and extract again (nothing "
                            "was changed)")
        if _is_folder(entry):
            _check_merge(archive, entry, to)


def _merge_into(src: Path, dest: Path) -> None:
    """Move everything under ``src`` into ``dest``, merging folders that already exist there."""
    for entry in src.iterdir():
        to = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and to.is_dir() and not to.is_symlink():
            _merge_into(entry, to)
        else:
            os.replace(entry, to)


@contextlib.contextmanager
def _reading(archive: Path):
    """Turn errors while reading ``archive``'s member list (a truncated or damaged file, e.g. a
    partial download) into :class:`IntegrityError`; nothing has been extracted at that point."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise IntegrityError(f"refusing to extract {archive}: it is corrupt or incomplete ({exc}); "
                             "nothing was extracted - delete it and download it again") from exc


def _extract_zip(archive: Path, target: Path) -> None:
    with _reading(archive):
        zf = zipfile.ZipFile(archive)
    with zf:
        with _reading(archive):
            members = [(info, _zip_symlink_target(zf, info)) for info in zf.infolist()]
        for info, link in members:
            _check_member(archive, info.filename, link)
        _check_links(archive, [(info.filename, link, False) for info, link in members])
        with _staged(archive, target, (zipfile.BadZipFile, zlib.error)) as stage:
            for info, link in members:
                if link is None:
                    zf.extract(info, stage)
                else:
                    dest = stage / info.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, dest)


def _extract_tar(archive: Path, target: Path) -> None:
    with _reading(archive):
        tf = tarfile.open(archive)
    with tf:
        with _reading(archive):
            members = tf.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise _member_error(archive, m.name, "is a device or FIFO, not a file or folder")
            _check_member(archive, m.name, m.linkname if m.issym() or m.islnk() else None, m.islnk())
        _check_links(archive, [(m.name, m.linkname if m.issym() or m.islnk() else None, m.islnk())
                               for m in members])
        # The checks above are the guarantee; the "data" filter (Python >= 3.11.4, 3.10.12)
        # additionally drops unsafe permission bits.
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with _staged(archive, target, (tarfile.TarError, zlib.error, EOFError)) as stage:
            tf.extractall(stage, members=members, **safety)


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a zip or tar (optionally compressed) archive into ``target`` and return it.

    Every member is checked before anything is written: a member with an absolute path, a ``..``
    path component, a symlink or hard link pointing outside ``target``, or (tar) a device or FIFO
    raises :class:`IntegrityError` naming the member, and ``target`` is left untouched. The archive
    is extracted into a staging folder (inside ``target``, or beside it when it does not exist yet)
    and merged into it only once complete, so
    a damaged member (bad CRC, truncated data) or a truncated archive (a partial download) also
    raises :class:`IntegrityError` and leaves ``target`` as it was. A ``target`` that is a symlink
    to a folder is that folder (checked and merged into like it).
    """
    archive, given = Path(archive), Path(target)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    _check_destination(given, None, "extract into")
    target = given.resolve() if given.is_symlink() else given  # a link to a folder: that folder
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive (or it is incomplete: delete it and "
                        "download it again); cannot extract it")
    return given
