"""A content-addressed file store on disk (images, uploaded assets).

A file is named by the sha256 of its bytes: ``root/ab/cd/abcd...`` (no extension; names given by
users never reach the filesystem), so the same bytes are stored once. Writes are atomic: the bytes
go to a temp file under ``root/.tmp`` (same filesystem, so the rename is atomic), are flushed and
fsynced, then ``os.replace``-d into place and the folder is fsynced. A reader therefore sees a
complete file or none, a failed write leaves nothing behind, and any number of threads and
processes may write the same or different content at once. (The temp file cannot sit in the final
folder because :meth:`FileStore.put_file` streams: the hash, hence the folder, is known only at
the end.) A full disk (or quota) is :class:`StorageFullError`, a sentence for the user, and leaves
nothing behind either.

The methods block; call them through ``asyncio.to_thread`` from async code. Deleting is the
caller's business (see :func:`storage.users.delete_user_data`): a file deleted while another
writer stores the same bytes is gone for both.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from storage.errors import BotError, InvalidRequestError

__all__ = ["CHUNK_SIZE", "STORAGE_FULL", "FileStore", "StorageFullError", "StoredFile"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_TMP_DIR = ".tmp"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
STORAGE_FULL = "The server ran out of disk space while saving your file; an admin needs to free some space."


class StorageFullError(BotError, OSError):
    """The disk (or the quota on it) is full; nothing was stored. Also an ``OSError``, as it was before."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file in the store; ``created``: this call wrote it (the bytes were not stored before)."""

    sha256: str
    size: int
    path: Path
    created: bool = field(default=False, compare=False)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _read_chunks(src: Path) -> Iterator[bytes]:
    with src.open("rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            yield chunk


class FileStore:
    """Content-addressed files under ``root`` (created on first write).

    Args:
        root: The store's folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    @property
    def temp_dir(self) -> Path:
        """Where writes in progress live (left-overs of a crash: :meth:`clean_temp`)."""
        return self.root / _TMP_DIR

    def path_for(self, sha256: str) -> Path:
        """Where the file with this hash lives; raises ``ValueError`` unless 64 lowercase hex digits."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the file is stored."""
        return self.path_for(sha256).is_file()

    def put_bytes(self, data: bytes) -> StoredFile:
        """Store ``data`` (a no-op when these bytes are already stored)."""
        sha256 = hashlib.sha256(data).hexdigest()
        final = self.path_for(sha256)
        if self._is_complete(final, len(data)):
            return StoredFile(sha256, len(data), final)
        return self._write([data], max_bytes=None)

    def put_file(self, src: Path, *, max_bytes: int | None = None) -> StoredFile:
        """Copy the file at ``src`` into the store, hashing it while streaming (one read).

        Args:
            src: The file to copy (left in place).
            max_bytes: Refuse files larger than this with :class:`InvalidRequestError`.
        """
        return self._write(_read_chunks(Path(src)), max_bytes=max_bytes)

    def put_stream(self, stream: BinaryIO, *, max_bytes: int | None = None) -> StoredFile:
        """Store everything read from ``stream`` (e.g. a download), like :meth:`put_file`."""
        return self._write(iter(lambda: stream.read(CHUNK_SIZE), b""), max_bytes=max_bytes)

    def open_bytes(self, sha256: str) -> BinaryIO:
        """Open the stored file for reading; ``FileNotFoundError`` if it is not stored."""
        return self.path_for(sha256).open("rb")

    def read_bytes(self, sha256: str) -> bytes:
        """The stored bytes; ``FileNotFoundError`` if they are not stored."""
        return self.path_for(sha256).read_bytes()

    def delete(self, sha256: str) -> bool:
        """Delete the file; returns whether it was there."""
        try:
            self.path_for(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_hashes(self) -> Iterator[str]:
        """Every stored hash, in sorted order (temp files and strays are skipped)."""
        if not self.root.is_dir():
            return
        for first in sorted(p for p in self.root.iterdir() if p.is_dir() and _HEX2.fullmatch(p.name)):
            for second in sorted(p for p in first.iterdir() if p.is_dir() and _HEX2.fullmatch(p.name)):
                for path in sorted(second.iterdir()):
                    name = path.name
                    if _SHA256.fullmatch(name) and name[:2] == first.name and name[2:4] == second.name:
                        yield name

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files older than ``older_than`` seconds (a crash's left-overs); returns how many."""
        if not self.temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for path in self.temp_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d stale temp file(s) from the file store", removed)
        return removed

    @staticmethod
    def _is_complete(final: Path, size: int) -> bool:
        try:
            return final.stat().st_size == size
        except FileNotFoundError:
            return False

    def _write(self, chunks: Iterable[bytes], *, max_bytes: int | None) -> StoredFile:
        """Write ``chunks`` to a temp file, then move it into place under its hash."""
        tmp: Path | None = None
        try:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.temp_dir, prefix="put-", suffix=".part")
            tmp = Path(tmp_name)
            with os.fdopen(fd, "wb") as fh:
                sha256, size = self._fill(fh, chunks, max_bytes)
            final = self.path_for(sha256)
            created = not self._is_complete(final, size)
            if created:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
                log.debug("stored %s (%d bytes)", sha256, size)
            else:
                tmp.unlink()  # the same bytes are stored already
        except BaseException as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                log.error("the file store at %s is out of space: %s", self.root, exc.strerror)
                raise StorageFullError(STORAGE_FULL) from exc
            raise
        return StoredFile(sha256, size, final, created)

    @staticmethod
    def _fill(fh: BinaryIO, chunks: Iterable[bytes], max_bytes: int | None) -> tuple[str, int]:
        """Write every chunk to ``fh``, flush and fsync it; returns the sha256 and size."""
        os.fchmod(fh.fileno(), 0o644)
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise InvalidRequestError(
                    f"The file is larger than the {_human_size(max_bytes)} limit; please use a smaller one."
                )
            digest.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        return digest.hexdigest(), size
