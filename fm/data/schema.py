"""Arrow schemas shared by the data stages: one per modality, plus the quarantine table.

Every modality table starts with the same columns (id .. meta), so curate, shard and the
statistics can treat all four alike; each modality then adds its own columns:

    text        text = the document
    code        text = the source file; lang = programming language ("python", "c", ...)
    image_text  text = the caption; image = PNG bytes resized to ingest.image_size
    triples     text = the linearized triple; subject, relation, object kept apart

`id` is a content hash (see `content_id`), so the same record gets the same id on every run
and exact duplicates share an id.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MODALITIES = ("text", "code", "image_text", "triples")
# The data stages write each modality's table as Parquet row groups of at most this many rows and read
# them back a row group at a time, so their memory does not grow with the corpus (issue 13).
PARTITION_ROWS = 4096


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)


_memory_lock = threading.Lock()
_memory_users = 0  # returned_memory blocks now open, in any thread (fm run runs tokenize and instructions at once)
_memory_saved_pool: pa.MemoryPool | None = None


def _mallopt(parameter: int, value: int) -> None:
    try:
        ctypes.CDLL(None).mallopt(parameter, value)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def returned_memory(threshold: int = 1 << 20):
    """For the block, freed memory goes back to the system instead of staying resident (the data stages, issue 13).

    - Arrow allocates from the system allocator, not its default mimalloc pool, which keeps freed pages: at 30x
      the sample, curate peaked 90-110 MB lower (bench/README.md).
    - Blocks of `threshold` bytes or more are mmapped. glibc raises its mmap threshold each time such a block is
      freed (up to 32 MiB), after which a stage's large short-lived buffers (a batch's Python strings, Parquet
      pages) come from the heap and stay resident once freed: 13% of curate's peak at 30x.

    Both settings are process-wide, so they are counted: set by the first block to open, restored by the last to
    close, whichever threads they run in. The threshold is then left at glibc's 32 MiB maximum, where the dynamic
    rule would end (training allocates large tensors each step, which should not be mmapped and zeroed anew)."""
    global _memory_users, _memory_saved_pool
    with _memory_lock:
        if _memory_users == 0:
            _memory_saved_pool = pa.default_memory_pool()
            pa.set_memory_pool(pa.system_memory_pool())
            _mallopt(_M_MMAP_THRESHOLD, threshold)
        _memory_users += 1
    try:
        yield
    finally:
        with _memory_lock:
            _memory_users -= 1
            if _memory_users == 0:
                pa.set_memory_pool(_memory_saved_pool)
                _mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def release_memory() -> None:
    """Hand the free pages inside glibc's heap back to the system (malloc_trim): what a batch's many small objects
    (pandas, GX) left behind when freed, which no threshold returns. A few milliseconds. No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rows_per_batch(path, max_rows: int = PARTITION_ROWS, max_bytes: int = 16 << 20) -> int:
    """Rows per batch for reading the Parquet file at `path`: max_rows, or fewer when its rows are large, so that
    a batch holds about max_bytes of (uncompressed) rows. From the file's metadata: the same however a stage runs."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return max(1, min(max_rows, max_bytes * max(meta.num_rows, 1) // max(size, 1)))


def read_batches(path, columns: list[str] | None = None, rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The Parquet table at `path`, `rows` rows a batch (rows_per_batch by default), as the data stages read their
    inputs: a page at a time with no read-ahead (pre-buffering reads whole column chunks ahead), so only about a
    batch is in memory however large the file (issue 13). Batches span row groups: batch k holds rows
    [k * rows, (k + 1) * rows)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    yield from file.iter_batches(batch_size=rows or rows_per_batch(path), columns=columns)

COMMON_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("source", pa.string()),  # a corpus name: jsonl "source" field, else the file's folder/stem
    pa.field("source_file", pa.string(), nullable=False),  # path relative to the raw corpus folder
    pa.field("position", pa.int64(), nullable=False),  # 1-based line for jsonl/tsv, 0 for a whole file
    pa.field("lang", pa.string()),
    pa.field("text", pa.string()),
    pa.field("n_bytes", pa.int64()),  # UTF-8 bytes of `text`
    pa.field("meta", pa.string()),  # JSON object with anything else the record carried
]

SCHEMAS: dict[str, pa.Schema] = {
    "text": pa.schema(COMMON_FIELDS),
    "code": pa.schema(COMMON_FIELDS),
    "image_text": pa.schema(
        COMMON_FIELDS
        + [
            pa.field("image", pa.binary()),  # PNG bytes after resize
            pa.field("image_width", pa.int32()),
            pa.field("image_height", pa.int32()),
        ]
    ),
    "triples": pa.schema(
        COMMON_FIELDS
        + [
            pa.field("subject", pa.string()),
            pa.field("relation", pa.string()),
            pa.field("object", pa.string()),
        ]
    ),
}

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("modality", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("id", pa.string()),  # null when the record never got that far
        pa.field("duplicate_of", pa.string()),  # the id that was kept, for a duplicate
    ]
)


def content_id(modality: str, *parts: str | bytes) -> str:
    """A stable id: sha256 over the modality and the record's content, 32 hex chars."""
    h = hashlib.sha256(modality.encode())
    for part in parts:
        h.update(b"\x00")
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:32]


_ID = re.compile("[0-9a-f]{32}")
_HEX_DIGIT = np.full(256, 255, np.uint8)  # byte -> its value as a lowercase hex digit, 255 for anything else
_HEX_DIGIT[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def id_keys(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Content ids (32 lowercase hex digits, as `content_id` makes them and validate requires) as two uint64 keys
    (hi, lo) that sort as the strings do: 16 bytes a row instead of a Python string, made without one."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    digits = None  # (n, 32) the digits' values, or None when some id is null or not 32 bytes long
    if not ids.null_count:
        try:
            fixed = pc.cast(ids, pa.binary(32))
        except pa.ArrowInvalid:  # an id of another length
            pass
        else:
            raw = np.frombuffer(fixed.buffers()[1], np.uint8, count=32 * len(fixed), offset=32 * fixed.offset) \
                if len(fixed) else np.zeros(0, np.uint8)
            digits = _HEX_DIGIT[raw].reshape(-1, 32)
    if digits is None or (digits == 255).any():
        bad = next(v for v in ids.to_pylist() if not (isinstance(v, str) and _ID.fullmatch(v)))
        raise ValueError(f"id {bad!r} is not 32 lowercase hex digits (validate only passes content ids)")
    packed = (digits[:, 0::2] << 4) | digits[:, 1::2]  # (n, 16) bytes, big-endian halves
    halves = packed.view(">u8").astype(np.uint64)  # (n, 2)
    return np.ascontiguousarray(halves[:, 0]), np.ascontiguousarray(halves[:, 1])


def empty_table(modality: str) -> pa.Table:
    return SCHEMAS[modality].empty_table()


def quarantine_table(rows: list[dict]) -> pa.Table:
    """Rows -> quarantine table; missing optional keys become null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in QUARANTINE_SCHEMA}
    return pa.table(cols, schema=QUARANTINE_SCHEMA)
