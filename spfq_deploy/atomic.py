"""Atomic file writes: temp file in the same directory, fsync, rename. A failed run leaves the
target as it was (absent or old), never half written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _new_file_mode(path: Path) -> int:
    """Keep an existing file's mode, else what open() gives (NamedTemporaryFile makes 0600)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    mode = _new_file_mode(path)
    tmp = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, mode)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the libc, kernel or file system lacks it."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst; FileExistsError if dst exists, even when another process creates it at
    the same moment (RENAME_NOREPLACE; elsewhere a check then rename, which a rename onto a
    non-empty folder cannot get wrong either)."""
    try:
        if _renameat2(src, dst, 1):
            return
    except OSError as exc:
        if exc.errno in (17, 39):  # EEXIST, ENOTEMPTY
            raise FileExistsError(exc.errno, exc.strerror, str(dst)) from None
        raise
    if os.path.lexists(dst):
        raise FileExistsError(17, "File exists", str(dst))
    os.rename(src, dst)


def exchange(src: Path, dst: Path) -> None:
    """Swap two existing folders in one step (RENAME_EXCHANGE), so dst is never missing; where
    the OS cannot, dst is moved aside first and src renamed into its place."""
    if _renameat2(src, dst, 2):
        return
    aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        rename_noreplace(src, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    os.rename(aside, src)


def _nearest_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            return p
    return Path("/")


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, force: bool = False, replaceable=None):
    """Yield a fresh temp directory next to `path`; on success it becomes `path` in one rename,
    on failure or interrupt it is removed: readers never see a half-written folder.

    An existing `path` is replaced only with force, and only when replaceable(path) (if given)
    returns None (else its text is the error). Without force the commit refuses to replace a
    folder that appeared meanwhile (another run finished first): exactly one of two runs wins."""
    from .errors import SpfqError

    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise SpfqError(f"{path} exists and is not a directory")
    if path.exists() and not force:
        raise SpfqError(f"{path} exists (use --force to replace it)")
    if path.exists() and replaceable is not None:
        why = replaceable(path)
        if why:
            raise SpfqError(why)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise SpfqError(f"{base} is not a directory: cannot create {path} inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise SpfqError(f"cannot create {path}: {exc.strerror or exc} ({exc.filename or path.parent})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
        yield stage
        try:
            if force and path.is_dir():
                why = replaceable(path) if replaceable is not None else None
                if why:
                    raise SpfqError(why)
                exchange(stage, path)  # stage now holds the old folder, removed below
            else:
                rename_noreplace(stage, path)
        except FileExistsError:
            raise SpfqError(f"{path} exists: another run created it while this one worked "
                            "(use --force to replace it)") from None
        except OSError as exc:
            raise SpfqError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
