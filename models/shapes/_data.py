"""The shapes training data pool: scenes drawn once from :class:`models.shapes.scenes.SceneDataset` (in
parallel processes) and cached in ``DIR/data.npz`` as uint8 images, background colours, captions and their
CLIP token ids (tokenized once)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.shapes._common import TOKEN_LENGTH, RunOptions
from models.shapes.scenes import COLOURS, SceneDataset
from models.tokenizer import load_clip_tokenizer

__all__ = ["ModesPool", "Pool", "load_modes_pool", "load_pool", "pool_size"]

log = logging.getLogger(__name__)

_CHUNK = 1000


@dataclass(frozen=True)
class Pool:
    """Pre-drawn training scenes: images (N×64×64×3 uint8), background colours (N×2×3 uint8: the second
    equals the first on a plain background), captions and their CLIP token ids (N×77 int32)."""

    images: np.ndarray
    backgrounds: np.ndarray
    captions: np.ndarray
    input_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _draw_chunk(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    seed, length, start, stop = job
    dataset = SceneDataset(seed, length, holdout="exclude", empty_caption_p=0.0)
    images = np.empty((stop - start, 64, 64, 3), np.uint8)
    backgrounds = np.empty((stop - start, 2, 3), np.uint8)
    captions = []
    for k, i in enumerate(range(start, stop)):
        item = dataset[i]
        images[k] = item["image"]
        bg = item["scene"].background
        backgrounds[k] = (COLOURS[bg[0]], COLOURS[bg[-1]])
        captions.append(item["caption"])
    return images, backgrounds, captions


def _draw_pool(seed: int, size: int, workers: int) -> Pool:
    jobs = [(seed, size, s, min(s + _CHUNK, size)) for s in range(0, size, _CHUNK)]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as procs:  # before any CUDA use; workers need no torch
            parts = procs.map(_draw_chunk, jobs, chunksize=1)
    else:
        parts = [_draw_chunk(job) for job in jobs]
    captions = [c for part in parts for c in part[2]]
    tokenizer = load_clip_tokenizer()
    ids = tokenizer(
        captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="np"
    )
    return Pool(
        images=np.concatenate([p[0] for p in parts]),
        backgrounds=np.concatenate([p[1] for p in parts]),
        captions=np.array(captions),
        input_ids=ids["input_ids"].astype(np.int32),
    )


def pool_size(opts: RunOptions, default: int) -> int:
    """``--pool`` if given, else the size of the pool already cached in ``DIR/data.npz``, else ``default``."""
    if opts.pool:
        return opts.pool
    path = opts.out / "data.npz"
    if path.is_file():
        with np.load(path) as data:
            return int(data["size"])
    return default


def load_pool(out: Path, seed: int, size: int, workers: int | None = None) -> Pool:
    """The pool of ``size`` scenes for ``seed``: from ``out/data.npz``, or drawn (in parallel) and cached."""
    path = out / "data.npz"
    if path.is_file():
        with np.load(path) as data:
            if int(data["seed"]) == seed and int(data["size"]) == size:
                log.info("data pool: %d scenes from %s", size, path)
                return Pool(data["images"], data["backgrounds"], data["captions"], data["input_ids"])
        log.info("data pool in %s is for another seed or size: drawing it again", path)
    workers = workers or (min(os.cpu_count() or 1, 16) if size >= 4 * _CHUNK else 1)
    started = time.monotonic()
    pool = _draw_pool(seed, size, workers)
    log.info("drew %d scenes in %.1f s with %d processes", size, time.monotonic() - started, workers)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("data.tmp.npz")
    with tmp.open("wb") as f:
        np.savez(
            f,
            seed=np.int64(seed),
            size=np.int64(size),
            images=pool.images,
            backgrounds=pool.backgrounds,
            captions=pool.captions,
            input_ids=pool.input_ids,
        )
    os.replace(tmp, path)
    return pool


@dataclass(frozen=True)
class ModesPool:
    """Training scenes for the inpainting and ControlNet stages: images (N×64×64×3 uint8), inpainting masks
    (N×64×64 uint8 0/255: one shape, grown), scribbles (N×64×64 uint8 0/255), captions, CLIP token ids."""

    images: np.ndarray
    masks: np.ndarray
    scribbles: np.ndarray
    captions: np.ndarray
    input_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _draw_modes_chunk(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    seed, length, start, stop = job
    dataset = SceneDataset(seed, length, holdout="exclude", empty_caption_p=0.0)
    items = [dataset[i] for i in range(start, stop)]
    return (
        np.stack([it["image"] for it in items]),
        np.stack([it["mask"] for it in items]),
        np.stack([it["scribble"] for it in items]),
        [it["caption"] for it in items],
    )


def load_modes_pool(out: Path, seed: int, size: int, workers: int | None = None) -> ModesPool:
    """The :class:`ModesPool` of ``size`` scenes for ``seed``: from ``out/modes_data.npz``, or drawn."""
    path = out / "modes_data.npz"
    keys = ("images", "masks", "scribbles", "captions", "input_ids")
    if path.is_file():
        with np.load(path) as data:
            if int(data["seed"]) == seed and int(data["size"]) == size:
                log.info("modes data pool: %d scenes from %s", size, path)
                return ModesPool(*(data[k] for k in keys))
    workers = workers or (min(os.cpu_count() or 1, 16) if size >= 4 * _CHUNK else 1)
    started = time.monotonic()
    jobs = [(seed, size, s, min(s + _CHUNK, size)) for s in range(0, size, _CHUNK)]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as procs:
            parts = procs.map(_draw_modes_chunk, jobs, chunksize=1)
    else:
        parts = [_draw_modes_chunk(job) for job in jobs]
    captions = [c for part in parts for c in part[3]]
    ids = load_clip_tokenizer()(
        captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="np"
    )["input_ids"].astype(np.int32)
    images, masks, scribbles = (np.concatenate([p[k] for p in parts]) for k in range(3))
    pool = ModesPool(images, masks, scribbles, np.array(captions), ids)
    log.info("drew %d scenes in %.1f s with %d processes", size, time.monotonic() - started, workers)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("modes_data.tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, seed=np.int64(seed), size=np.int64(size), **{k: getattr(pool, k) for k in keys})
    os.replace(tmp, path)
    return pool
