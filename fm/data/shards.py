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
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from fm.config import ShardConfig
from fm.data.schema import MODALITIES
from fm.data.tokenizer import SPECIAL_IDS, curated_tables, lang_token, load_tokenizer, modality_token
from fm.io import atomic_dir, sha256_file
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

def stream_order(modality: str, table: pa.Table, cfg: ShardConfig) -> tuple[pa.Table, pa.Table]:
    """(rows, docs): the curated rows in token-stream order with a `doc` column, and one row per
    token document (doc, text, source, lang).

    The order depends only on the content and `cfg.seed`: rows are sorted by id first, so the
    curated file's row order does not matter.
    """
    table = table.set_column(table.schema.get_field_index("text"), "text", pc.fill_null(table["text"], ""))
    rng = np.random.default_rng([cfg.seed, MODALITIES.index(modality)])  # one stream per modality
    if modality != "triples":
        table = table.sort_by([("id", "ascending"), ("source_file", "ascending"), ("position", "ascending")])
        perm = rng.permutation(table.num_rows)  # (N,) int64
        rows = table.take(perm).append_column("doc", pa.array(np.arange(table.num_rows), pa.int64()))
        return rows, rows.select(["doc", "text", "source", "lang"])

    # Triples: a document is a paragraph of facts about one subject.
    group = ("subject", "lang", "source")  # one subject, in one language, from one source
    table = table.sort_by([(c, "ascending") for c in group + ("relation", "object", "id")])
    keys = list(zip(*(table[c].to_pylist() for c in group)))
    paragraph = np.empty(len(keys), np.int64)  # (N,) paragraph of each triple
    n_par, run = -1, 0
    for i, key in enumerate(keys):  # per triple, not per token
        if i == 0 or key != keys[i - 1] or run == cfg.triples_per_document:
            n_par, run = n_par + 1, 0
        paragraph[i] = n_par
        run += 1
    n_par += 1
    doc_of_paragraph = np.empty(n_par, np.int64)
    doc_of_paragraph[rng.permutation(n_par)] = np.arange(n_par)  # paragraph -> shuffled ordinal
    doc = doc_of_paragraph[paragraph]  # (N,)
    order = np.argsort(doc, kind="stable")  # keeps facts sorted within a paragraph
    rows = table.take(order).append_column("doc", pa.array(doc[order], pa.int64()))
    texts = rows["text"].to_pylist()
    bounds = np.flatnonzero(np.diff(doc[order], prepend=-1))  # first row of each document
    first = rows.take(pa.array(bounds, pa.int64()))
    ends = list(bounds[1:]) + [rows.num_rows]
    docs = pa.table({
        "doc": pa.array(np.arange(n_par), pa.int64()),
        "text": ["\n".join(texts[a:b]) for a, b in zip(bounds, ends)],
        "source": first["source"],
        "lang": first["lang"],
    })
    return rows, docs


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


def drop_withheld(table: pa.Table, withheld: set[tuple[str, str, str]]) -> pa.Table:
    """The triples table without the rows whose (subject, relation, lang) is withheld."""
    if not withheld or table.num_rows == 0:
        return table
    keys = zip(*(table[c].to_pylist() for c in ("subject", "relation", "lang")))
    keep = pa.array([key not in withheld for key in keys], pa.bool_())
    return table.filter(keep)


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


def encode_documents(tok, docs: pa.Table, modality: str, codes: dict, writer: TokenShardWriter, progress=None, task=None) -> int:
    """Encode one modality's documents in large batches and feed them to `writer`; returns tokens."""
    framing = (SPECIAL_IDS[modality_token(modality)], SPECIAL_IDS["<|endoftext|>"])
    lang_ids = {lang: SPECIAL_IDS[lang_token(lang)] for lang in codes["lang"]}
    n_bytes = pc.binary_length(pc.cast(docs["text"], pa.binary())).to_numpy(zero_copy_only=False)  # (D,) UTF-8 bytes
    cumulative = np.cumsum(n_bytes)  # (D,)
    cuts = np.searchsorted(cumulative, np.arange(ENCODE_BATCH_BYTES, cumulative[-1] if len(cumulative) else 0, ENCODE_BATCH_BYTES), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(n_bytes)]]))  # batch k is rows bounds[k]:bounds[k+1]
    batches = [docs.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    total = 0
    # encode_batch_fast runs on all Rust threads, releases the GIL and skips the offsets we never
    # use; a worker thread encodes batch k+1 while this thread frames and writes batch k.
    with ThreadPoolExecutor(max_workers=1) as pool:
        def encode(k):
            return pool.submit(tok.encode_batch_fast, batches[k]["text"].to_pylist(), add_special_tokens=False)

        pending = encode(0) if batches else None
        for k, batch in enumerate(batches):
            encodings = pending.result()
            if k + 1 < len(batches):
                pending = encode(k + 1)
            flat: list[int] = []
            lengths: list[int] = []
            for enc, lang in zip(encodings, batch["lang"].to_pylist()):  # per document; extend copies ids in C
                ids = enc.ids
                flat.append(framing[0])
                flat.append(lang_ids[lang or ""])
                flat.extend(ids)
                flat.append(framing[1])
                lengths.append(len(ids) + 3)
            del encodings
            tokens = np.array(flat, dtype=writer.buf.dtype)  # (N,) the batch's documents, framed, back to back
            lengths = np.array(lengths, np.int64)  # (D,) tokens per document incl. the 3 framing tokens
            index = np.empty(len(lengths), INDEX_DTYPE)
            index["start"] = np.cumsum(lengths) - lengths
            index["length"] = lengths
            index["doc"] = batch["doc"].to_numpy()
            index["modality"] = MODALITIES.index(modality)
            index["source"] = _encode_codes(batch["source"], codes["source"])
            index["lang"] = _encode_codes(batch["lang"], codes["lang"])
            writer.add(tokens, index)
            total += len(tokens)
            if progress is not None:
                progress.advance(task, int(n_bytes[bounds[k]:bounds[k + 1]].sum()))
    writer.flush()
    return total


def _encode_codes(column: pa.ChunkedArray, names: list[str]) -> np.ndarray:
    """Strings (null -> "") -> their positions in the sorted code table `names`."""
    values = pc.fill_null(column, "")
    return pc.index_in(values, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- Arrow shards and manifest

def write_arrow_shards(table: pa.Table, out_dir: Path, stem: str, rows_per_shard: int) -> list[Path]:
    """Uncompressed Arrow IPC files (memory-mappable), `rows_per_shard` rows each."""
    out = []
    for k, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        path = out_dir / f"{stem}-{k:05d}.arrow"
        with ipc.new_file(path, table.schema) as w:
            w.write_table(table.slice(start, rows_per_shard))
        out.append(path)
    return out


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


def _arrow_entries(files: list[Path], kind: str, modality: str, rows: pa.Table, per_shard: int) -> list[dict]:
    entries = []
    for k, path in enumerate(files):
        part = rows.slice(k * per_shard, per_shard)
        entries.append({"path": path.name, "kind": kind, "modality": modality, "sha256": sha256_file(path),
                        "bytes": path.stat().st_size, "tokens": 0, "documents": part.num_rows,
                        "mix": _mix(part["modality"].to_pylist(), pc.fill_null(part["source"], "").to_pylist(),
                                    pc.fill_null(part["lang"], "").to_pylist())})
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
    with atomic_dir(out_dir) as tmp, Progress(
        TextColumn("[bold]shard[/] {task.description}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console,
    ) as progress:
        for modality, path in tables:
            table = pq.read_table(path)
            if modality == "triples":
                kept = drop_withheld(table, withheld)
                dropped, table = table.num_rows - kept.num_rows, kept
            rows, docs = stream_order(modality, table, cfg)
            task = progress.add_task(modality, total=int(pc.sum(pc.binary_length(pc.cast(docs["text"], pa.binary()))).as_py() or 0))
            writer = TokenShardWriter(tmp, modality, cfg.tokens_per_shard, dtype)
            n_tokens = encode_documents(tok, docs, modality, codes, writer, progress, task)
            counts[modality] = {"docs": docs.num_rows, "rows": rows.num_rows, "tokens": n_tokens}
            entries += _token_entries(writer, codes, dtype)

            doc_rows = rows.drop_columns([c for c in IMAGE_COLUMNS if c in rows.column_names])
            files = write_arrow_shards(doc_rows, tmp, f"docs-{modality}", cfg.docs_per_arrow_shard)
            entries += _arrow_entries(files, "docs", modality, rows, cfg.docs_per_arrow_shard)
            if modality == "image_text":
                files = write_arrow_shards(rows, tmp, "image_text", cfg.docs_per_arrow_shard)
                entries += _arrow_entries(files, "images", modality, rows, cfg.docs_per_arrow_shard)

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
    """The manifest of a shard folder; with `verify`, check every file's size and sha256 (ValueError if off)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run `fm shard` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
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
