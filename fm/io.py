"""Atomic outputs: every file or folder a stage writes appears complete or not at all.

    with atomic_path(out / "text.parquet") as tmp:
        pq.write_table(table, tmp)          # tmp is renamed to text.parquet on success

An interrupted stage leaves only a `.tmp-*` name behind, never a half-written output that a
rerun (or DVC) would take for done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def _name_output(e: OSError, path: Path) -> None:
    """pyarrow's and numpy's write errors (a full disk) name no file: name the output being written."""
    if e.strerror and not e.filename:  # an OSError("message") keeps its message as it is
        e.filename = str(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _name_output(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder; it replaces `path` (and all it held) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _tmp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _name_output(e, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def scratch_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A temporary folder under `parent` for a stage's intermediate files, removed when done. Named like the
    other temporaries (.tmp-<8 hex>-name), so a killed run's leftover is found and removed by the next run."""
    path = _tmp_name(Path(parent) / name)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# (sha256, time.time_ns() before the stat) per (path, size, mtime_ns): a stage's multi-GB output is hashed once in a
# process, not again as the next stage's input (fm.registry.content_hash) nor by a loader's check (known_hash)
_file_hashes: dict[tuple[str, int, int], tuple[str, int]] = {}
SETTLED_NS = 2 * 10**9  # known_hash: more than any filesystem's timestamp tick (FAT's is 2 s)


def _key(path: str | os.PathLike, st: os.stat_result) -> tuple[str, int, int]:
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256_file, computed once per (path, size, mtime) in this process."""
    taken = time.time_ns()
    key = _key(path, os.stat(path))
    if key not in _file_hashes:
        _file_hashes[key] = (sha256_file(path), taken)
    return _file_hashes[key][0]


def known_hash(path: str | os.PathLike, st: os.stat_result) -> str | None:
    """The sha256 this process computed for `path` (cached_sha256, or a loader's remember_hash) if `st`, its stat
    now, proves it unchanged since; else None: hash it again. So a stage's loader checks a shard against its manifest
    without a second sha256 pass after the stage door's. Proof, stricter than cached_sha256's own reuse: the same
    size and mtime, and a ctime at least SETTLED_NS older than the hash. Every write, rename or utime sets the ctime
    to the time of the change (no call sets it back, as cp -p or touch -r set an old mtime back), so a file changed
    after its hash has a later ctime, even one changed within the same clock tick (git's "racily clean" case)."""
    found = _file_hashes.get(_key(path, st))
    return found[0] if found and st.st_ctime_ns < found[1] - SETTLED_NS else None


def remember_hash(path: str | os.PathLike, st: os.stat_result, sha256: str, taken: int) -> None:
    """Record the sha256 of `path` computed outside cached_sha256: `st` is its stat before the read, `taken` the
    time.time_ns() before that stat."""
    _file_hashes[_key(path, st)] = (sha256, taken)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
