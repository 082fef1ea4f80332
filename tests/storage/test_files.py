"""FileStore: content addressing, atomic writes, concurrent writers (threads and processes)."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from storage.errors import InvalidRequestError
from storage.files import CHUNK_SIZE, FileStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "files")


def test_layout_and_round_trip(store: FileStore) -> None:
    data = b"hello, dreamcord"
    digest = _sha(data)
    stored = store.put_bytes(data)
    assert stored.sha256 == digest and stored.size == len(data)
    assert stored.path == store.root / digest[:2] / digest[2:4] / digest
    assert stored.path.read_bytes() == data
    assert store.exists(digest) and store.read_bytes(digest) == data
    with store.open_bytes(digest) as fh:
        assert fh.read() == data
    assert list(store.iter_hashes()) == [digest]
    assert not list(store.temp_dir.iterdir())


def test_same_bytes_stored_once_different_bytes_apart(store: FileStore, tmp_path: Path) -> None:
    a, b = b"a" * 1000, b"a" * 999 + b"b"
    first = store.put_bytes(a)
    mtime = first.path.stat().st_mtime_ns
    src = tmp_path / "upload.safetensors"
    src.write_bytes(a)
    assert store.put_file(src) == first  # same bytes, from a file this time
    assert store.put_bytes(a) == first
    assert first.path.stat().st_mtime_ns == mtime  # not rewritten
    second = store.put_bytes(b)
    assert second.sha256 != first.sha256 and second.path != first.path
    assert sorted(store.iter_hashes()) == sorted([_sha(a), _sha(b)])
    assert len(_all_files(store.root)) == 2  # no temp files either
    assert src.read_bytes() == a  # the source is left alone


def test_put_file_streams_large_files(store: FileStore, tmp_path: Path) -> None:
    data = _content(1, 3 * CHUNK_SIZE + 12345)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    stored = store.put_file(src)
    assert stored.sha256 == _sha(data) and stored.size == len(data)
    assert store.read_bytes(stored.sha256) == data


def test_put_stream(store: FileStore) -> None:
    import io

    data = _content(2, CHUNK_SIZE + 7)
    assert store.put_stream(io.BytesIO(data)).sha256 == _sha(data)


def test_empty_file(store: FileStore) -> None:
    stored = store.put_bytes(b"")
    assert stored.sha256 == _sha(b"") and stored.path.read_bytes() == b""


def test_max_bytes(store: FileStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(_content(3, 2 * CHUNK_SIZE))
    with pytest.raises(InvalidRequestError) as info:
        store.put_file(src, max_bytes=CHUNK_SIZE)
    assert "1.0 MiB" in str(info.value) and str(tmp_path) not in str(info.value)
    assert _all_files(store.root) == []
    assert store.put_file(src, max_bytes=2 * CHUNK_SIZE).size == 2 * CHUNK_SIZE


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "../" + "0" * 61, "0" * 62 + "/x", None, 123],
)
def test_bad_sha256_rejected(store: FileStore, bad: Any) -> None:
    for method in (store.path_for, store.exists, store.read_bytes, store.delete, store.open_bytes):
        with pytest.raises(ValueError):
            method(bad)


def test_delete_and_missing(store: FileStore) -> None:
    digest = store.put_bytes(b"bye").sha256
    assert store.delete(digest) is True
    assert store.delete(digest) is False
    assert not store.exists(digest)
    with pytest.raises(FileNotFoundError):
        store.read_bytes(digest)
    assert list(store.iter_hashes()) == []


def test_iter_hashes_skips_strays(store: FileStore) -> None:
    digests = sorted(store.put_bytes(bytes([i])).sha256 for i in range(5))
    (store.root / "README").write_text("not a blob")
    misplaced = "f" * 64
    (store.root / "00" / "00").mkdir(parents=True)
    (store.root / "00" / "00" / misplaced).write_bytes(b"wrong folder")
    (store.temp_dir / "put-x.part").write_bytes(b"half")
    assert list(store.iter_hashes()) == digests
    assert list(FileStore(store.root / "nothing").iter_hashes()) == []


def test_clean_temp(store: FileStore) -> None:
    store.put_bytes(b"x")
    old, new = store.temp_dir / "put-old.part", store.temp_dir / "put-new.part"
    old.write_bytes(b"1")
    new.write_bytes(b"2")
    os.utime(old, (1_000_000, 1_000_000))
    assert store.clean_temp(older_than=60) == 1
    assert not old.exists() and new.exists()


class _FailingFile:
    """Wraps a real file; the first write stores half its bytes, then fails as if the disk were full."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def _fail_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FailingFile(real_fdopen(*a, **k)))


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_write, _fail_fsync, _fail_replace])
@pytest.mark.parametrize("how", ["bytes", "file"])
def test_failed_write_leaves_nothing(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: Any, how: str
) -> None:
    keep = store.put_bytes(b"already here")
    data = _content(4, 2 * CHUNK_SIZE + 1)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with monkeypatch.context() as patch:
        fail(patch)
        with pytest.raises(OSError):
            store.put_bytes(data) if how == "bytes" else store.put_file(src)
    assert not store.exists(_sha(data))
    assert _all_files(store.root) == [keep.path]  # no half file, no temp file
    assert store.put_file(src).sha256 == _sha(data)  # and the store still works


def test_final_file_appears_only_by_an_atomic_rename(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes go to a temp file, are fsynced, renamed into place, then the folder is fsynced."""
    data = _content(5, 3 * CHUNK_SIZE + 1)
    final = store.path_for(_sha(data))
    events: list[Any] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", Path(src).parent, Path(dst), Path(src).stat().st_size, final.exists()))
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    class Stream:
        def __init__(self) -> None:
            self.offset = 0

        def read(self, size: int) -> bytes:
            assert not final.exists()  # nothing at the final path while writing
            chunk = data[self.offset : self.offset + size]
            self.offset += len(chunk)
            return chunk

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    assert store.put_stream(Stream()).path == final  # type: ignore[arg-type]
    assert events == ["fsync", ("replace", store.temp_dir, final, len(data), False), "fsync"]
    assert final.read_bytes() == data


# --- concurrency -------------------------------------------------------------------------------

CONTENTS = [(seed, 200_000 + seed * 150_000) for seed in range(6)]  # 0.2 to 1 MB, some > CHUNK_SIZE
THREADS, PROCESSES, ROUNDS = 8, 4, 3

_start_barrier: Any = None  # set in each worker process by _init_process


def _init_process(barrier: Any) -> None:
    global _start_barrier
    _start_barrier = barrier


def _writer(root: str, worker: int, barrier: Any = None) -> tuple[int, list[str]]:
    """Wait for every writer, then write each content ROUNDS times in a worker-specific order."""
    store = FileStore(Path(root))
    rng = random.Random(worker)
    scratch = Path(root).parent / f"src-{worker}"
    scratch.mkdir()
    (barrier or _start_barrier).wait(timeout=120)
    hashes = []
    for _ in range(ROUNDS):
        order = list(CONTENTS)
        rng.shuffle(order)
        for seed, size in order:
            data = _content(seed, size)
            if rng.random() < 0.5:
                hashes.append(store.put_bytes(data).sha256)
            else:
                src = scratch / f"{seed}.bin"
                src.write_bytes(data)
                hashes.append(store.put_file(src).sha256)
    return os.getpid(), hashes


def test_concurrent_writers_threads_and_processes(tmp_path: Path) -> None:
    root = tmp_path / "files"
    expected = {_sha(_content(seed, size)): _content(seed, size) for seed, size in CONTENTS}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(THREADS + PROCESSES)  # all writers start at once
    procs = ProcessPoolExecutor(PROCESSES, mp_context=ctx, initializer=_init_process, initargs=(barrier,))
    with procs, ThreadPoolExecutor(THREADS) as threads:
        futures = [procs.submit(_writer, str(root), 100 + i) for i in range(PROCESSES)]
        futures += [threads.submit(_writer, str(root), i, barrier) for i in range(THREADS)]
        results = [f.result(timeout=240) for f in futures]

    pids = {pid for pid, _ in results}
    assert len(pids) == PROCESSES + 1 and os.getpid() in pids  # really 4 processes and this one
    for _, hashes in results:
        assert set(hashes) == set(expected) and len(hashes) == ROUNDS * len(CONTENTS)
    store = FileStore(root)
    assert sorted(store.iter_hashes()) == sorted(expected)
    for digest, data in expected.items():
        on_disk = store.read_bytes(digest)
        assert on_disk == data and _sha(on_disk) == digest
    assert list(store.temp_dir.iterdir()) == []
    assert len(_all_files(root)) == len(expected)
