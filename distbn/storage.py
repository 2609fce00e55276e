"""Writes that can fail for reasons outside the program (a full disk or quota, a read-only
mount, a forbidden or missing folder): every such failure becomes one :class:`StorageError`
that names the path and the reason, so the trainer can stop with one line.

Checksums (:func:`write_checksums`, :func:`damaged`) for the files a reader must trust
(checkpoints, exports). Also the two writes whose readers must never see half of them:
:func:`append_line` (a record of metrics.jsonl is there whole or not at all) and
:func:`write_text` (temporary file, then rename).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

# Below this many free bytes a write that MXNet reports only as "incomplete" is put down to a
# full disk (MXNet's file stream does not pass errno on).
_NEARLY_FULL = 1 << 16


class StorageError(Exception):
    """A file or folder of the run could not be written."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = Path(path), reason


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


@contextmanager
def writing(path):
    """Turns the failures of writing ``path`` (OSError, and MXNet's own file errors) into a
    :class:`StorageError`."""
    path = Path(path)
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(path, e.strerror or str(e)) from None
    except Exception as e:  # MXNetError from save_parameters / save_states
        if type(e).__name__ != "MXNetError":
            raise
        reason = (os.strerror(errno.ENOSPC) if _free_bytes(path) < _NEARLY_FULL else
                  f"MXNet could not write it ({str(e).strip().splitlines()[-1][:200]})")
        raise StorageError(path, reason) from None


def append_line(path: Path, line: str) -> None:
    """Appends ``line`` + newline in one write; on any failure the file is cut back to its
    former length, so it never ends in a partial record."""
    data = (line + "\n").encode()
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(path: Path, files) -> None:
    """``path`` lists the SHA-256 of ``files`` (of its folder) as ``sha256sum`` writes them
    (``sha256sum -c`` checks them), flushed to disk."""
    with writing(path):
        with open(path, "w") as f:
            f.write("".join(f"{sha256(p)}  {Path(p).name}\n" for p in files))
            f.flush()
            os.fsync(f.fileno())


def damaged(checksums: Path) -> Optional[str]:
    """The first file ``checksums`` lists that is missing or no longer has its checksum, as
    'NAME is missing' or 'NAME differs from its checksum'; None when every one is intact."""
    for line in checksums.read_text().splitlines():
        digest, name = line.split(None, 1)
        f = checksums.parent / name.strip()
        if not f.is_file():
            return f"{f.name} is missing"
        if sha256(f) != digest:
            return f"{f.name} differs from its checksum ({checksums.name})"
    return None


def prepare_dir(path: Path, need_bytes: int = 0) -> None:
    """Creates ``path`` (and its parents), proves it writable with a small file, and checks
    that its file system has ``need_bytes`` free."""
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"distbn")
                os.fsync(f.fileno())
        finally:
            if probe.exists():
                probe.unlink()
    free = _free_bytes(path)
    if free < need_bytes:
        raise StorageError(path, f"{free} bytes free, one checkpoint needs about {need_bytes}")
