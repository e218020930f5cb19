"""Tokenize-to-shards throughput against raw `Tokenizer.encode_batch` on the same strings.

    .venv/bin/python bench/tokenize_bench.py [--workdir data] [--raw data/01_raw] [--repeats 3]

Corpus: the curated tables `<workdir>/04_curated/*.parquet` if present; else the raw sample's
text (`text` of text/*.jsonl, text/*.txt) and code (code files, `content` of code/*.jsonl) put
into curated-schema tables; it stops with a message if neither exists. Everything is written
to a temporary work dir, never to `data/`.

Trains the tokenizer once (timed), then, interleaved in one process, `--repeats` times:
  raw       tokenizer.encode_batch(texts): the baseline, on exactly the strings fm encodes
  raw_fast  tokenizer.encode_batch_fast(texts): the same without offsets (what fm calls)
  fm        fm.data.shards.write_shards: read parquet, encode, write memmaps, indexes, Arrow
            document/image shards, sha256 and manifest (the whole stage)
and prints median MB/s (UTF-8 bytes of the encoded text per wall second, and per CPU second of
this process, all threads: steadier when other jobs share the cores) and fm / raw (target >= 0.8).
JSON goes to bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tokenizers  # noqa: E402

from fm.config import ShardConfig, TokenizeConfig, load_params  # noqa: E402
from fm.data import shards  # noqa: E402
from fm.data.schema import MODALITIES, SCHEMAS, content_id  # noqa: E402
from fm.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from fm.paths import Paths  # noqa: E402


def raw_tables(raw: Path) -> dict[str, pa.Table]:
    """Text and code of the raw corpus as curated-schema tables (no validation or dedup)."""
    docs: dict[str, list[tuple[str, str, str]]] = {"text": [], "code": []}  # (text, lang, file)
    for path in sorted((raw / "text").rglob("*")):
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and isinstance(rec := json.loads(line), dict) and isinstance(rec.get("text"), str):
                    docs["text"].append((rec["text"], rec.get("lang") or "", str(path)))
        elif path.suffix == ".txt":
            docs["text"].append((path.read_text(encoding="utf-8", errors="replace"), "", str(path)))
    for path in sorted((raw / "code").rglob("*")):
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and isinstance(rec := json.loads(line), dict) and isinstance(rec.get("content"), str):
                    docs["code"].append((rec["content"], rec.get("language") or "", str(path)))
        elif path.is_file():
            docs["code"].append((path.read_text(encoding="utf-8", errors="replace"), path.suffix.lstrip("."), str(path)))
    tables = {}
    for modality, items in docs.items():
        if items:
            rows = [{"id": content_id(modality, t, f), "modality": modality, "source": Path(f).stem, "source_file": f,
                     "position": i, "lang": lang or None, "text": t, "n_bytes": len(t.encode()), "meta": "{}"}
                    for i, (t, lang, f) in enumerate(items)]
            tables[modality] = pa.Table.from_pylist(rows, schema=SCHEMAS[modality])
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--raw", type=Path, default=Path("data/01_raw"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/tokenize.json"))
    args = ap.parse_args()

    params = load_params(args.params) if args.params.exists() else None
    tok_cfg = params.tokenize if params else TokenizeConfig()
    shard_cfg = params.shard if params else ShardConfig()

    curated = sorted(Path(args.workdir, "04_curated").glob("*.parquet"))
    curated = [p for p in curated if p.stem in MODALITIES]
    if curated:
        corpus, tables = f"curated tables in {args.workdir / '04_curated'}", {p.stem: pq.read_table(p) for p in curated}
    elif args.raw.is_dir():
        corpus, tables = f"raw text + code under {args.raw} (no curated tables)", raw_tables(args.raw)
    else:
        tables = {}
    if not tables:
        sys.exit(f"no corpus: neither {args.workdir / '04_curated'}/*.parquet nor text/code under {args.raw}; "
                 "run `fm curate` or add the sample corpus")

    tmp = Path(tempfile.mkdtemp(prefix="fm-tokenize-bench-"))
    try:
        result = measure(tables, corpus, tmp, args, tok_cfg, shard_cfg)
    finally:
        shutil.rmtree(tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def measure(tables: dict[str, pa.Table], corpus: str, tmp: Path, args, tok_cfg: TokenizeConfig, shard_cfg: ShardConfig) -> dict:
    """Train once, then time raw / raw_fast / fm interleaved; print and return the figures."""
    paths = Paths(raw=args.raw, workdir=tmp)
    paths.curated.mkdir(parents=True)
    for modality, table in tables.items():
        pq.write_table(table, paths.curated / f"{modality}.parquet")

    t0 = time.perf_counter()
    tok_summary = train_tokenizer(tok_cfg, paths)
    train_seconds = time.perf_counter() - t0

    # The exact strings the shard stage encodes, in its order (triples grouped into paragraphs).
    texts = []
    for modality in MODALITIES:
        if modality in tables:
            texts += shards.stream_order(modality, tables[modality], shard_cfg)[1]["text"].to_pylist()
    n_bytes = sum(len(t.encode()) for t in texts)
    tok = load_tokenizer(paths)
    tok.encode_special_tokens = True  # as the shard stage does

    def run_raw():
        tok.encode_batch(texts)

    def run_raw_fast():
        tok.encode_batch_fast(texts)

    def run_fm():
        shards.write_shards(shard_cfg, paths)

    runs = {"raw": run_raw, "raw_fast": run_raw_fast, "fm": run_fm}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}  # all threads of this process
    run_fm()  # warm-up: page cache, allocator
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate so drift hits both
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            runs[name]()
            seconds[name].append(time.perf_counter() - t)
            cpu_seconds[name].append(time.process_time() - c)

    mbps = {name: n_bytes / 1e6 / statistics.median(s) for name, s in seconds.items()}
    mb_per_cpu_s = {name: n_bytes / 1e6 / statistics.median(s) for name, s in cpu_seconds.items()}
    manifest = shards.load_manifest(paths.tokens / "shards")
    result = {
        "corpus": corpus,
        "documents": len(texts),
        "text_mb": round(n_bytes / 1e6, 3),
        "tokens": manifest["totals"]["tokens"],
        "vocab_size": tok_summary["vocab_size"],
        "bytes_per_token": tok_summary["bytes_per_token"],
        "train_seconds": round(train_seconds, 3),
        "train_mb": round(tok_summary["train_bytes"] / 1e6, 3),
        "repeats": args.repeats,
        "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
        "cpu_seconds": {k: [round(x, 4) for x in v] for k, v in cpu_seconds.items()},
        "mb_per_s_median": {k: round(v, 3) for k, v in mbps.items()},
        "mb_per_cpu_s_median": {k: round(v, 3) for k, v in mb_per_cpu_s.items()},
        "ratio_fm_over_raw": round(mbps["fm"] / mbps["raw"], 3),
        "ratio_fm_over_raw_fast": round(mbps["fm"] / mbps["raw_fast"], 3),
        "cpu_ratio_fm_over_raw": round(mb_per_cpu_s["fm"] / mb_per_cpu_s["raw"], 3),
        "target_ratio": 0.8,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tokenizers": tokenizers.__version__},
    }
    print(f"corpus: {corpus}: {len(texts)} docs, {n_bytes / 1e6:.2f} MB, {result['tokens']} tokens")
    print(f"train tokenizer (vocab {result['vocab_size']}, {result['train_mb']} MB): {train_seconds:.2f} s;"
          f" bytes/token {tok_summary['bytes_per_token']}")
    for name in runs:
        print(f"{name:9s} {mbps[name]:8.2f} MB/s wall {mb_per_cpu_s[name]:8.2f} MB/cpu-s"
              f"   (wall s: {[round(x, 2) for x in seconds[name]]})")
    print(f"fm / raw encode_batch = {result['ratio_fm_over_raw']:.3f} (target >= 0.8);"
          f" fm / raw encode_batch_fast = {result['ratio_fm_over_raw_fast']:.3f};"
          f" per CPU-second (less sensitive to a busy machine) fm / raw = {result['cpu_ratio_fm_over_raw']:.3f}")
    return result


if __name__ == "__main__":
    main()
