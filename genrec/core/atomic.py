"""Atomic writes: a temp file (or directory) beside the target, renamed into place, so a crash never leaves half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# tempfile makes private files (0600) and directories (0700); what we publish gets the modes of a plain open() or
# mkdir() under the process umask (0644 / 0755 under the usual 022), so a server running as another user (the
# Docker image's) can read a mounted bundle.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path` for a writer that wants a file name (torch.save, faiss, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kwargs):
    """Open a temp file beside `path`; on success it is fsynced and renamed over `path`, on error deleted."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically (parent folders are created)."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temp directory; on success it replaces `path` (the old one is removed after the swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`. An existing `dst` is moved aside first and deleted after; readers that
    open `dst` between the two renames see it missing for microseconds, never half-written."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.rmdir(old)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
