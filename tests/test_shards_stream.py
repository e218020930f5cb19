"""The shard stage streams (issue 13): the same shards whatever the partition size, and peak memory that does not
grow with the corpus (a process of its own per run, its peak RSS from wait4).

    pytest tests/test_shards_stream.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

import fm.data.shards as shards
from fm.config import ShardConfig
from fm.data.schema import SCHEMAS, content_id
from fm.data.shards import load_manifest, write_shards
from fm.paths import Paths
from tests.test_shards import write_curated

REPO = Path(__file__).resolve().parent.parent


def contents(shard_dir: Path) -> dict:
    """Every file's content: token and index files by sha256, Arrow files as rows (their batch layout aside)."""
    out = {}
    for entry in load_manifest(shard_dir)["shards"]:
        path = shard_dir / entry["path"]
        if entry["kind"] in ("tokens", "index"):
            out[entry["path"]] = entry["sha256"]
        else:
            with ipc.open_file(path) as f:
                out[entry["path"]] = f.read_all().to_pylist()
    return out


def test_tiny_partitions_give_the_same_shards(tmp_path, monkeypatch):
    paths = write_curated(tmp_path / "data")
    cfg = ShardConfig(tokens_per_shard=64, docs_per_arrow_shard=4, triples_per_document=2, seed=3)
    write_shards(cfg, paths)
    expected, manifest = contents(paths.tokens / "shards"), load_manifest(paths.tokens / "shards")
    monkeypatch.setattr(shards, "PARTITION_ROWS", 2)  # rows streamed 2 at a time, Arrow record batches of 2
    write_shards(cfg, paths)
    assert contents(paths.tokens / "shards") == expected
    again = load_manifest(paths.tokens / "shards")
    assert again["totals"]["counts"] == manifest["totals"]["counts"] and again["codes"] == manifest["codes"]
    with ipc.open_file(paths.tokens / "shards" / "docs-text-00000.arrow") as f:
        assert f.num_record_batches == 2  # 4 rows per file, 2 per batch: the stream was in pieces


CHILD = """
import re, sys
from fm.config import ShardConfig
from fm.data.shards import write_shards
from fm.paths import Paths
write_shards(ShardConfig(), Paths(sys.argv[1], sys.argv[1]))
print(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def _image_corpus(workdir: Path, n: int, image_bytes: int, tokenizer: Path) -> Paths:
    """Curated tables with n image-caption rows of `image_bytes` incompressible image bytes each."""
    paths = Paths(workdir / "01_raw", workdir)
    paths.curated.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [{"id": content_id("image_text", str(i)), "modality": "image_text", "source": "synthetic",
             "source_file": "image_text/m.jsonl", "position": i + 1, "lang": "en", "text": f"caption number {i}",
             "n_bytes": 16, "meta": None, "image": rng.bytes(image_bytes), "image_width": 64, "image_height": 64}
            for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["image_text"]), paths.curated / "image_text.parquet",
                   row_group_size=256)
    for m in ("text", "code", "triples"):
        pq.write_table(SCHEMAS[m].empty_table(), paths.curated / f"{m}.parquet")
    paths.tokens.mkdir(parents=True)
    (paths.tokens / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return paths


def _peak_rss_mb(paths: Paths) -> float:
    """The child's own peak resident set (VmHWM, kB). Not wait4's ru_maxrss: that keeps the high-water mark of
    the memory the child had before exec, i.e. this test process's."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(paths.workdir)], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1]) / 1024


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """40 MB of images against 160 MB: the whole-table shard held every image two or three times (the table, its
    shuffled copy, the Arrow shards' slices), +300 MB here; streamed, the two runs peak alike."""
    tok_paths = write_curated(tmp_path / "tok")
    small = _peak_rss_mb(_image_corpus(tmp_path / "small", 1000, 40_000, tok_paths.tokens / "tokenizer.json"))
    large = _peak_rss_mb(_image_corpus(tmp_path / "large", 4000, 40_000, tok_paths.tokens / "tokenizer.json"))
    manifest = json.loads((tmp_path / "large" / "05_tokens" / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["counts"]["image_text"]["rows"] == 4000
    assert large - small < 60, (small, large)


def test_the_plan_on_key_ranks_orders_rows_as_sorting_the_key_strings_does():
    """The stage plans on 4-byte ranks of one key column at a time; the order must be the one a sort of the strings
    themselves gives (ties broken by the next key, nulls last), and a triples paragraph one (subject, lang, source)."""
    rng = np.random.default_rng(3)
    n = 2000
    words = ["", "a", "ab", "b", "Ä", "文", "a\x00", None]
    keys = pa.table({c: pa.array([words[k] for k in rng.integers(0, len(words), n)], pa.string())
                     for c in ("subject", "lang", "source", "relation", "object")})
    keys = keys.append_column("id", pa.array([f"{k:04d}" for k in rng.permutation(n)]))
    cfg = ShardConfig(triples_per_document=3)
    for modality, columns in shards.PLAN_KEYS.items():
        ranks = {c: shards.key_ranks(keys[c] if c in keys.column_names else keys["id"]) for c in columns}
        rows, doc = shards.stream_plan(modality, ranks, cfg)
        names = [c if c in keys.column_names else "id" for c in columns]
        by_strings = pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in names]).to_numpy()
        if modality != "triples":
            shuffle = np.random.default_rng([cfg.seed, shards.MODALITIES.index(modality)]).permutation(n)
            assert rows.tolist() == by_strings[shuffle].tolist()
            continue
        assert sorted(rows.tolist()) == list(range(n)) and (np.diff(doc) >= 0).all()
        position = np.empty(n, np.int64)
        position[by_strings] = np.arange(n)
        for d in np.unique(doc):  # a paragraph: consecutive rows of the sorted order, one group, at most 3 facts
            members = rows[doc == d]
            assert np.diff(position[members]).tolist() == [1] * (len(members) - 1) and len(members) <= 3
            group = {tuple(keys[c][int(r)].as_py() for c in ("subject", "lang", "source")) for r in members}
            assert len(group) == 1
