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


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, force: bool = False):
    """Yield a fresh temp directory next to `path`; on success it replaces `path` (an existing
    `path` only with force), on failure it is removed: readers never see a half-written folder."""
    from .errors import SpfqError

    path = Path(path)
    if path.exists() and not force:
        raise SpfqError(f"{path} exists (use --force to replace it)")
    if path.exists() and not path.is_dir():
        raise SpfqError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield stage
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(stage, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
