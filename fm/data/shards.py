"""The shard stage: curated tables -> token shards, Arrow document shards and a manifest.

    fm shard                         # data/04_curated + data/05_tokens/tokenizer.json -> data/05_tokens/shards/

Everything lands in one folder, written under a temporary name and renamed when complete:

    shards/
      text-00000.bin              tokens, flat little-endian uint16 (uint32 if vocab > 65536)
      text-00000.idx.npy          index: one row per document span in that .bin (INDEX_DTYPE)
      code-00000.bin ...          one group of token shards per modality, so the loader can
                                  mix modalities and sources by weight and route experts by domain
      docs-text-00000.arrow       the curated rows (Arrow IPC file), in token-stream order,
                                  with a `doc` column linking each row to its token document
      image_text-00000.arrow      image-caption pairs with the PNG bytes (what CLIP reads)
      manifest.json               every file with kind, sha256, bytes, token/document counts,
                                  mix; the tokenizer's sha256 and vocab size; code tables; totals
                                  (a token shard's "documents" counts its index rows, so a
                                  document cut by a boundary counts in both shards; totals
                                  count each document once)

What the model sees. Every document becomes

    <|modality|> <|lang:xx|> text <|endoftext|>

(the text is encoded with special-token matching off, so a literal "<|endoftext|>" inside a
document is just bytes and cannot forge a control token). Documents are shuffled within
their modality with `shard.seed` and concatenated into one flat stream per modality that is
cut every `shard.tokens_per_shard` tokens; a document cut by a boundary has one index row in
each shard (same `doc`). Knowledge triples are injected as short fact paragraphs: triples
are grouped by (subject, lang, source), sorted by relation and object, and up to
`shard.triples_per_document` of their linearizations (`text`, e.g. "Paris | capital of |
France") are joined one per line into one document:

    <|triples|><|lang:en|>Paris | capital of | France
    Paris | located in | Europe<|endoftext|>

Memory does not grow with the corpus (issue 13). The order is planned on a few key columns (stream_plan:
ids, or the triples' grouping keys), then DuckDB streams the rows in that order out of core
(ordered_batches, spilling to a temporary folder under 05_tokens), PARTITION_ROWS rows at a time, into the
tokenizer (batches of ENCODE_BATCH_BYTES of text), the token shard writer and the Arrow shard writers. The
outputs do not depend on how the rows are batched.

Knowledge-injection control: the triples of the facts listed in `05_instructions/withheld.parquet`
(fm.data.instructions: a share of the instruction set's held-out facts) are left out, matched on
(subject, relation, lang); the manifest's `withheld` entry counts them and records that file's sha256.

Reading back: `read_token_shard(path)` (np.memmap), `read_index(path)`, `load_manifest(dir)`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fm.config import ShardConfig
from fm.data.schema import MODALITIES, PARTITION_ROWS, read_batches, rows_per_batch
from fm.data.tokenizer import SPECIAL_IDS, curated_tables, lang_token, load_tokenizer, modality_token
from fm.io import atomic_dir, scratch_dir, sha256_file
from fm.paths import Paths

MANIFEST_FORMAT = 1
# One row per document span in a token shard; loads with np.load(allow_pickle=False).
INDEX_DTYPE = np.dtype([
    ("start", "<i8"),  # token offset of the span in its .bin
    ("length", "<i4"),  # tokens in the span (a whole document unless cut by a shard boundary)
    ("doc", "<i8"),  # document ordinal in its modality's stream (= `doc` in docs-<modality>-*.arrow)
    ("modality", "<i2"),  # code into manifest["codes"]["modality"]
    ("source", "<i4"),  # code into manifest["codes"]["source"]
    ("lang", "<i4"),  # code into manifest["codes"]["lang"] (the exact lang, e.g. "python")
])
ENCODE_BATCH_BYTES = 4 << 20  # text per encode_batch call: enough work for every Rust thread
IMAGE_COLUMNS = ("image", "image_width", "image_height")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so a vocab of up to 65536 fits; larger vocabs need uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---------------------------------------------------------------- documents in stream order

PLAN_KEYS = {"text": ("id", "source_file", "position"), "code": ("id", "source_file", "position"),
             "image_text": ("id", "source_file", "position"),
             "triples": ("subject", "lang", "source", "relation", "object", "id")}


def key_ranks(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) uint32: each value's dense rank among the column's values (equal values share a rank, nulls rank
    last), so comparing ranks orders and groups rows as comparing the values would, at 4 bytes a row."""
    return pc.rank(values, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.uint32)


def stream_plan(modality: str, ranks: dict[str, np.ndarray], cfg: ShardConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, doc): for each position of the modality's token stream, the row it holds (an index into the rank
    arrays) and that row's document ordinal. ranks: key_ranks of each PLAN_KEYS column of the rows, in file
    order (the order is planned on these alone, 4 bytes a key; the rows themselves are streamed in it afterwards).

    The order depends only on the content and `cfg.seed`: rows are sorted by id first (triples: by subject,
    lang, source, relation, object, id), so the curated file's row order does not matter.
    """
    rng = np.random.default_rng([cfg.seed, MODALITIES.index(modality)])  # one stream per modality
    order = np.lexsort([ranks[c] for c in reversed(PLAN_KEYS[modality])])  # (N,) rows in key order (stable)
    if modality != "triples":
        return order[rng.permutation(len(order))], np.arange(len(order), dtype=np.int64)

    # Triples: a document is a paragraph of facts about one subject, in one language, from one source, of at
    # most triples_per_document facts (a subject's run of facts is cut every triples_per_document rows).
    n = len(order)
    starts_group = np.zeros(n, bool)  # (N,) first row of a (subject, lang, source) run in sorted order
    starts_group[:1] = True
    for column in ("subject", "lang", "source"):
        in_order = ranks[column][order]
        starts_group[1:] |= in_order[1:] != in_order[:-1]
    rows = np.arange(n)
    group_start = np.maximum.accumulate(np.where(starts_group, rows, 0))  # (N,) row where each row's run began
    paragraph = np.cumsum(starts_group | ((rows - group_start) % cfg.triples_per_document == 0)) - 1  # (N,)
    n_par = int(paragraph[-1]) + 1 if n else 0
    doc_of_paragraph = np.empty(n_par, np.int64)
    doc_of_paragraph[rng.permutation(n_par)] = np.arange(n_par)  # paragraph -> shuffled ordinal
    doc = doc_of_paragraph[paragraph]  # (N,)
    within = np.argsort(doc, kind="stable")  # keeps facts sorted within a paragraph
    return order[within], doc[within]


def stream_order(modality: str, table: pa.Table, cfg: ShardConfig) -> tuple[pa.Table, pa.Table]:
    """(rows, docs) of a whole table in memory: the rows in token-stream order with a `doc` column, and one
    row per token document (doc, text, source, lang). The stage streams the same order (ordered_batches)."""
    rows_at, doc = stream_plan(modality, {c: key_ranks(table[c]) for c in PLAN_KEYS[modality]}, cfg)
    rows = _filled(table.take(pa.array(rows_at))).append_column("doc", pa.array(doc, pa.int64()))
    builder = DocumentBuilder(modality)
    docs = list(builder.add(rows)) + list(builder.finish())
    return rows, pa.concat_tables(docs) if docs else pa.table({c: [] for c in DocumentBuilder.COLUMNS})


def _filled(table: pa.Table) -> pa.Table:
    """Null text as "" (a document of no bytes still gets its framing tokens)."""
    return table.set_column(table.schema.get_field_index("text"), "text", pc.fill_null(table["text"], ""))


class DocumentBuilder:
    """Rows in stream order -> token documents (doc, text, source, lang). A text, code or image_text row is one
    document; a triples document joins its rows' texts one per line, and may span two batches of rows."""

    COLUMNS = ["doc", "text", "source", "lang"]

    def __init__(self, modality: str):
        self.joined = modality == "triples"
        self.pending: pa.Table | None = None  # triples: the rows of the last document, which may continue

    def add(self, rows: pa.Table):
        if not self.joined:
            yield rows.select(self.COLUMNS)
            return
        if self.pending is not None:
            rows = pa.concat_tables([self.pending, rows.select(self.COLUMNS)])
        else:
            rows = rows.select(self.COLUMNS)
        doc = rows["doc"].to_numpy()
        last = int(np.searchsorted(doc, doc[-1], side="left")) if len(doc) else 0  # first row of the last document
        self.pending = rows.slice(last)
        if last:
            yield self._join(rows.slice(0, last))

    def finish(self):
        if self.joined and self.pending is not None and self.pending.num_rows:
            yield self._join(self.pending)
        self.pending = None

    @staticmethod
    def _join(rows: pa.Table) -> pa.Table:
        doc = rows["doc"].to_numpy()
        bounds = np.flatnonzero(np.diff(doc, prepend=-1))  # first row of each document
        texts = rows["text"].to_pylist()
        ends = list(bounds[1:]) + [rows.num_rows]
        first = rows.take(pa.array(bounds, pa.int64()))
        return pa.table({"doc": first["doc"], "text": ["\n".join(texts[a:b]) for a, b in zip(bounds, ends)],
                         "source": first["source"], "lang": first["lang"]})


def read_withheld(path: Path) -> set[tuple[str, str, str]]:
    """{(subject, relation, lang)} of a withheld-facts table (fm.data.instructions.WITHHELD_SCHEMA): the triples
    pretraining leaves out. Empty when the file does not exist (a corpus sharded without an instruction set)."""
    path = Path(path)
    if not path.is_file():
        return set()
    try:
        table = pq.read_table(path, columns=["subject", "relation", "lang"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise ValueError(f"{path} is not a withheld-facts table ({e}): rerun `fm instructions`") from None
    return set(zip(*(table[c].to_pylist() for c in ("subject", "relation", "lang"))))


def withheld_mask(triples: pa.Table, withheld: set[tuple[str, str, str]]) -> np.ndarray:
    """(N,) bool: the triples whose (subject, relation, lang) is withheld, matched in Arrow (no Python object a row)."""
    def joined(subjects, relations, langs):
        parts = [pc.fill_null(pa.array(c, pa.string()) if not isinstance(c, (pa.Array, pa.ChunkedArray)) else
                              c.cast(pa.string()), "") for c in (subjects, relations, langs)]
        return pc.binary_join_element_wise(*parts, "\x1f")

    wanted = joined(*zip(*withheld))
    return pc.is_in(joined(triples["subject"], triples["relation"], triples["lang"]),
                    value_set=wanted).to_numpy(zero_copy_only=False)


MAX_BUCKETS = 256  # spill files open at once while ordered_batches distributes the rows
def ordered_batches(path: Path, schema: pa.Schema, rows_at: np.ndarray, doc: np.ndarray, spill: Path,
                    batch_rows: int | None = None):
    """The rows of a Parquet file in the planned order (rows_at[s] is the file row at stream position s), each
    with its `doc` column, in batches of about PARTITION_ROWS rows.

    An external bucket shuffle: one pass over the file, a row group at a time, appends each row to the spill
    file of its bucket of stream positions (Arrow IPC under `spill`); then each bucket is read, put in order
    and yielded. Only a row group or a bucket is in memory at a time, however large the corpus."""
    batch_rows = batch_rows or rows_per_batch(path)
    seq_of_row = np.full(pq.read_metadata(path).num_rows, -1, np.int64)  # (rows,) stream position of each file row
    seq_of_row[rows_at] = np.arange(len(rows_at))
    bucket_rows = max(batch_rows, -(-len(rows_at) // MAX_BUCKETS))
    target = schema.append(pa.field("doc", pa.int64()))
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    try:
        offset = 0
        for batch in read_batches(path, rows=batch_rows):
            seqs = seq_of_row[offset:offset + batch.num_rows]
            offset += batch.num_rows
            table = pa.Table.from_batches([batch]).cast(schema).append_column("seq", pa.array(seqs))
            buckets = seqs // bucket_rows  # -1: a row left out of the stream
            for k in np.unique(buckets[buckets >= 0]):
                part = table.filter(pa.array(buckets == k))
                if k not in writers:
                    writers[k] = ipc.new_stream(spill / f"bucket-{k:06d}.arrow", part.schema)
                writers[k].write_table(part)
    finally:
        for writer in writers.values():
            writer.close()
    for k in sorted(writers):
        bucket = spill / f"bucket-{k:06d}.arrow"
        with ipc.open_stream(bucket) as reader:
            table = reader.read_all()
        bucket.unlink()
        seqs = table["seq"].to_numpy()
        table = table.take(pa.array(np.argsort(seqs))).drop_columns(["seq"])
        table = table.append_column("doc", pa.array(doc[np.sort(seqs)], pa.int64())).cast(target)
        for start in range(0, table.num_rows, batch_rows):
            yield _filled(table.slice(start, batch_rows))


# ---------------------------------------------------------------- token shards

class TokenShardWriter:
    """Cuts one modality's token stream into .bin shards of at most `cap` tokens, with an index each."""

    def __init__(self, out_dir: Path, modality: str, cap: int, dtype: np.dtype):
        self.out_dir, self.modality, self.cap = out_dir, modality, cap
        self.buf = np.empty(cap, dtype)  # (cap,) the shard being filled
        self.fill = 0
        self.spans: list[np.ndarray] = []  # INDEX_DTYPE rows of the shard being filled
        self.written: list[tuple[Path, Path, str, int]] = []  # (bin, idx, bin sha256, tokens)

    def add(self, tokens: np.ndarray, index: np.ndarray) -> None:
        """Append a batch: `tokens` (N,) and its documents `index` (D,) with starts relative to `tokens`."""
        starts = index["start"]
        ends = starts + index["length"]
        pos = 0
        while pos < len(tokens):
            take = min(self.cap - self.fill, len(tokens) - pos)
            lo = np.searchsorted(ends, pos, side="right")  # first document ending after pos
            hi = np.searchsorted(starts, pos + take, side="left")  # documents starting before the cut
            part = index[lo:hi].copy()
            s = np.maximum(starts[lo:hi], pos)  # clip spans to [pos, pos + take)
            e = np.minimum(ends[lo:hi], pos + take)
            part["start"] = s - pos + self.fill
            part["length"] = e - s
            self.spans.append(part)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        stem = f"{self.modality}-{len(self.written):05d}"
        data = self.buf[:self.fill]
        bin_path, idx_path = self.out_dir / f"{stem}.bin", self.out_dir / f"{stem}.idx.npy"
        data.tofile(bin_path)
        np.save(idx_path, np.concatenate(self.spans), allow_pickle=False)
        self.written.append((bin_path, idx_path, hashlib.sha256(data).hexdigest(), self.fill))
        self.fill, self.spans = 0, []


def encode_documents(tok, doc_batches, modality: str, codes: dict, writer: TokenShardWriter) -> tuple[int, int]:
    """Encode a modality's documents (tables of doc, text, source, lang in stream order, any number of rows
    each) in batches of about ENCODE_BATCH_BYTES of text and feed them to `writer`; returns (documents, tokens)."""
    framing = (SPECIAL_IDS[modality_token(modality)], SPECIAL_IDS["<|endoftext|>"])
    lang_ids = {lang: SPECIAL_IDS[lang_token(lang)] for lang in codes["lang"]}

    def frame(batch: pa.Table, encodings) -> int:
        flat: list[int] = []
        lengths: list[int] = []
        for enc, lang in zip(encodings, batch["lang"].to_pylist()):  # per document; extend copies ids in C
            flat.append(framing[0])
            flat.append(lang_ids[lang or ""])
            flat.extend(enc.ids)
            flat.append(framing[1])
            lengths.append(len(enc.ids) + 3)
        tokens = np.array(flat, dtype=writer.buf.dtype)  # (N,) the batch's documents, framed, back to back
        sizes = np.array(lengths, np.int64)  # (D,) tokens per document incl. the 3 framing tokens
        index = np.empty(len(sizes), INDEX_DTYPE)
        index["start"] = np.cumsum(sizes) - sizes
        index["length"] = sizes
        index["doc"] = batch["doc"].to_numpy()
        index["modality"] = MODALITIES.index(modality)
        index["source"] = _encode_codes(batch["source"], codes["source"])
        index["lang"] = _encode_codes(batch["lang"], codes["lang"])
        writer.add(tokens, index)
        return len(tokens)

    documents = total = 0
    # encode_batch_fast runs on all Rust threads, releases the GIL and skips the offsets we never use; a worker
    # thread encodes batch k+1 while this thread frames and writes batch k.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None  # (batch, the future of its encodings)
        for batch in _byte_batches(doc_batches):
            future = pool.submit(tok.encode_batch_fast, batch["text"].to_pylist(), add_special_tokens=False)
            if pending is not None:
                total += frame(pending[0], pending[1].result())
            pending = (batch, future)
            documents += batch.num_rows
        if pending is not None:
            total += frame(pending[0], pending[1].result())
    writer.flush()
    return documents, total


def _byte_batches(doc_batches):
    """Tables of documents regrouped into batches of about ENCODE_BATCH_BYTES of text (enough work for every
    Rust thread of the tokenizer, little enough memory)."""
    parts, size = [], 0
    for docs in doc_batches:
        n_bytes = pc.binary_length(pc.cast(docs["text"], pa.binary())).to_numpy(zero_copy_only=False)  # (D,)
        cumulative = np.cumsum(n_bytes)
        start = 0
        while start < docs.num_rows:
            room = ENCODE_BATCH_BYTES - size  # the first document past the budget closes the batch
            end = int(np.searchsorted(cumulative - (cumulative[start - 1] if start else 0), room, side="left")) + 1
            end = min(max(end, start + 1), docs.num_rows)
            parts.append(docs.slice(start, end - start))
            size += int(n_bytes[start:end].sum())
            start = end
            if size >= ENCODE_BATCH_BYTES:
                yield pa.concat_tables(parts)
                parts, size = [], 0
    if parts:
        yield pa.concat_tables(parts)


def _encode_codes(column: pa.ChunkedArray, names: list[str]) -> np.ndarray:
    """Strings (null -> "") -> their positions in the sorted code table `names`."""
    values = pc.fill_null(column, "")
    return pc.index_in(values, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- Arrow shards and manifest

class ArrowShardWriter:
    """Rows in stream order -> uncompressed Arrow IPC files (memory-mappable) of `rows_per_shard` rows each,
    written in record batches of a fixed size, so the files are the same however the rows arrive."""

    def __init__(self, out_dir: Path, stem: str, kind: str, modality: str, rows_per_shard: int, schema: pa.Schema,
                 batch_rows: int | None = None):
        self.out_dir, self.stem, self.kind, self.modality = out_dir, stem, kind, modality
        self.per_shard, self.schema = rows_per_shard, schema
        self.chunk = min(rows_per_shard, batch_rows or PARTITION_ROWS)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.file = None  # (path, ipc writer, rows written, mix counters) of the open file
        self.entries: list[dict] = []

    def write(self, rows: pa.Table) -> None:
        self.buffer.append(rows.select(self.schema.names).cast(self.schema))
        self.buffered += rows.num_rows
        while self.buffered >= self.chunk:
            self._emit(self.chunk)

    def close(self) -> list[dict]:
        while self.buffered:
            self._emit(min(self.chunk, self.buffered))
        self._close_file()
        return self.entries

    def _emit(self, n: int) -> None:
        table = pa.concat_tables(self.buffer)
        if self.file is not None:
            n = min(n, self.per_shard - self.file[2])  # never past the open file's end
        head, rest = table.slice(0, n), table.slice(n)
        self.buffer, self.buffered = [rest], rest.num_rows
        if self.file is None:
            path = self.out_dir / f"{self.stem}-{len(self.entries):05d}.arrow"
            self.file = [path, ipc.new_file(path, self.schema), 0, (Counter(), Counter(), Counter())]
        self.file[1].write_table(head.combine_chunks(), max_chunksize=n)
        self.file[2] += n
        for counter, column in zip(self.file[3], ("modality", "source", "lang")):
            counter.update(pc.fill_null(head[column], "").to_pylist())
        if self.file[2] == self.per_shard:
            self._close_file()

    def _close_file(self) -> None:
        if self.file is None:
            return
        path, writer, n, (modalities, sources, langs) = self.file
        writer.close()
        self.entries.append({"path": path.name, "kind": self.kind, "modality": self.modality,
                             "sha256": sha256_file(path), "bytes": path.stat().st_size, "tokens": 0, "documents": n,
                             "mix": {"modality": dict(sorted(modalities.items())), "source": dict(sorted(sources.items())),
                                     "lang": dict(sorted(langs.items()))}})
        self.file = None


def _mix(modalities, sources, langs) -> dict:
    return {"modality": dict(sorted(Counter(modalities).items())), "source": dict(sorted(Counter(sources).items())),
            "lang": dict(sorted(Counter(langs).items()))}


def _token_entries(writer: TokenShardWriter, codes: dict, dtype: np.dtype) -> list[dict]:
    entries = []
    for bin_path, idx_path, bin_sha, n_tokens in writer.written:
        index = np.load(idx_path, allow_pickle=False)
        mix = _mix([codes["modality"][i] for i in index["modality"]], [codes["source"][i] for i in index["source"]],
                   [codes["lang"][i] for i in index["lang"]])
        token_mix = {key: {} for key in mix}
        for key in token_mix:  # tokens per modality / source / lang, what mixing weights act on
            sums = np.bincount(index[key], weights=index["length"], minlength=len(codes[key]))
            token_mix[key] = {codes[key][i]: int(n) for i, n in enumerate(sums) if n}
        common = {"modality": writer.modality, "documents": len(index), "mix": mix}
        entries.append({"path": bin_path.name, "kind": "tokens", "sha256": bin_sha, "bytes": bin_path.stat().st_size,
                        "tokens": n_tokens, "dtype": dtype.str, **common, "token_mix": token_mix})
        entries.append({"path": idx_path.name, "kind": "index", "sha256": sha256_file(idx_path),
                        "bytes": idx_path.stat().st_size, "tokens": n_tokens, "dtype": INDEX_DTYPE.descr, **common})
    return entries


# ---------------------------------------------------------------- the stage

def write_shards(cfg: ShardConfig, paths: Paths) -> dict:
    """Tokenize the curated corpus into `paths.tokens/shards/`; return a summary."""
    start = time.perf_counter()
    tok = load_tokenizer(paths)  # document text never produces control tokens (see open_tokenizer)
    tables = curated_tables(paths)
    n_rows = {modality: pq.read_metadata(path).num_rows for modality, path in tables}
    if not any(n_rows.values()):  # an empty modality is fine; an empty corpus is nothing to train on
        rows = ", ".join(f"{m}: {n}" for m, n in n_rows.items())
        raise ValueError(f"shard: nothing to shard: the curated tables in {paths.curated} hold no record "
                         f"(rows per modality: {rows}); see {paths.quarantine} for why records were removed")
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    tokenizer_path = paths.tokens / "tokenizer.json"

    # Code tables first (cheap: two columns per table), so every index file uses the same codes.
    sources, langs = set(), set()
    for _, path in tables:
        t = pq.read_table(path, columns=["source", "lang"])
        sources.update(pc.unique(pc.fill_null(t["source"], "")).to_pylist())
        langs.update(pc.unique(pc.fill_null(t["lang"], "")).to_pylist())
    codes = {"modality": list(MODALITIES), "source": sorted(sources), "lang": sorted(langs)}

    withheld_path = paths.instructions / "withheld.parquet"
    withheld = read_withheld(withheld_path)
    dropped = 0
    out_dir = paths.tokens / "shards"
    counts, entries = {}, []
    console = Console(stderr=True)
    with atomic_dir(out_dir) as tmp, scratch_dir(paths.tokens, "shard-spill") as spill, \
            Progress(TextColumn("[bold]shard[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                     TextColumn("rows"), TimeRemainingColumn(), console=console) as progress:
        for modality, path in tables:
            keep = np.ones(n_rows[modality], bool)
            if modality == "triples" and withheld:
                keep = np.concatenate([~withheld_mask(batch, withheld)
                                       for batch in read_batches(path, ["subject", "relation", "lang"])] or [keep])
                dropped = int((~keep).sum())
            kept_rows = np.flatnonzero(keep)  # (K,) file rows that go into the stream
            # One key column in memory at a time, ranked (4 bytes a row): a corpus's key strings never are.
            ranks = {c: key_ranks(pq.read_table(path, columns=[c])[c])[kept_rows] for c in PLAN_KEYS[modality]}
            plan_rows, doc = stream_plan(modality, ranks, cfg)
            del ranks
            schema = pq.read_schema(path)
            task = progress.add_task(modality, total=len(plan_rows))
            writer = TokenShardWriter(tmp, modality, cfg.tokens_per_shard, dtype)
            doc_schema = pa.schema([f for f in schema if f.name not in IMAGE_COLUMNS]).append(pa.field("doc", pa.int64()))
            batch_rows = rows_per_batch(path)
            docs_out = ArrowShardWriter(tmp, f"docs-{modality}", "docs", modality, cfg.docs_per_arrow_shard, doc_schema)
            images_out = (ArrowShardWriter(tmp, "image_text", "images", modality, cfg.docs_per_arrow_shard,
                                           schema.append(pa.field("doc", pa.int64())), batch_rows)
                          if modality == "image_text" else None)
            builder = DocumentBuilder(modality)

            def documents(progress_task=task):
                for rows in ordered_batches(path, schema, kept_rows[plan_rows], doc, spill, batch_rows):
                    docs_out.write(rows)
                    if images_out is not None:
                        images_out.write(rows)
                    progress.advance(progress_task, rows.num_rows)
                    yield from builder.add(rows)
                yield from builder.finish()

            n_docs, n_tokens = encode_documents(tok, documents(), modality, codes, writer)
            counts[modality] = {"docs": n_docs, "rows": len(plan_rows), "tokens": n_tokens}
            entries += _token_entries(writer, codes, dtype)
            entries += docs_out.close()
            if images_out is not None:
                entries += images_out.close()

        token_entries = [e for e in entries if e["kind"] == "tokens"]
        manifest = {
            "format": MANIFEST_FORMAT,
            "tokenizer": {"path": "../tokenizer.json", "sha256": sha256_file(tokenizer_path), "vocab_size": vocab_size},
            "dtype": dtype.str,
            "byteorder": "little",
            "index_dtype": INDEX_DTYPE.descr,
            "special_tokens": SPECIAL_IDS,
            "config": {"tokens_per_shard": cfg.tokens_per_shard, "docs_per_arrow_shard": cfg.docs_per_arrow_shard,
                       "triples_per_document": cfg.triples_per_document, "seed": cfg.seed},
            "codes": codes,
            "withheld": {"facts": len(withheld), "triples": dropped,
                         "sha256": sha256_file(withheld_path) if withheld_path.is_file() else None},
            "shards": entries,
            "totals": {
                "tokens": sum(c["tokens"] for c in counts.values()),
                "documents": sum(c["docs"] for c in counts.values()),
                "token_shards": len(token_entries),
                "files": len(entries),
                "bytes": sum(e["bytes"] for e in entries),
                "counts": counts,
                "token_mix": {key: _sum_dicts(e["token_mix"][key] for e in token_entries) for key in ("modality", "source", "lang")},
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return {
        "stage": "shard",
        "counts": {m: {"docs": c["docs"], "tokens": c["tokens"]} for m, c in counts.items()},
        "shards": len(token_entries),
        "tokens": manifest["totals"]["tokens"],
        "withheld": manifest["withheld"],
        "outputs": [str(out_dir)],
        "seconds": round(time.perf_counter() - start, 3),
    }


def _sum_dicts(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


# ---------------------------------------------------------------- readers

def load_manifest(shard_dir: str | Path, verify: bool = False) -> dict:
    """The manifest of a shard folder; with `verify`, check every file's size and sha256 (ValueError if off).
    A manifest cut short or overwritten is a ValueError naming it, not a JSONDecodeError or KeyError without a path
    raised by whichever reader first indexes it."""
    shard_dir = Path(shard_dir)
    path = shard_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run `fm shard` first")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e}): it was cut short or overwritten; "
                         f"rerun `fm shard`") from None
    # What every reader indexes (the rest, e.g. dtype or codes, only some): checked here once, by name.
    needed = ("path", "kind", "bytes", "sha256") if verify else ("path", "kind")
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{path} lacks its list of shards (\"shards\"): it was cut short or overwritten; "
                         f"rerun `fm shard`")
    for i, entry in enumerate(shards):
        missing = [k for k in needed if k not in entry] if isinstance(entry, dict) else list(needed)
        if missing:
            raise ValueError(f"{path}: shard entry {i} lacks {', '.join(missing)}: it was cut short or overwritten; "
                             f"rerun `fm shard`")
    if verify:
        for entry in manifest["shards"]:
            file = shard_dir / entry["path"]
            if not file.exists() or file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise ValueError(f"{file}: missing or does not match its sha256 in {path}")
    return manifest


def read_token_shard(path: str | Path, dtype: str | np.dtype | None = None) -> np.memmap:
    """A token shard as a read-only (N,) memmap; the dtype comes from the manifest beside it unless given."""
    path = Path(path)
    if dtype is None:
        dtype = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))["dtype"]
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def read_index(path: str | Path) -> np.ndarray:
    """A shard's index (INDEX_DTYPE rows), loaded without pickle."""
    return np.load(path, allow_pickle=False)
