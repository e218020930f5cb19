"""scripts/scale_corpus.py: an N-times corpus whose copies the pipeline keeps as distinct documents, each copy's
records spliced from real ones, sources unchanged, and copy 0 the corpus itself.

    pytest tests/test_scale_corpus.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fm.config import CurateConfig, IngestConfig, ValidateConfig
from fm.data.curate import curate
from fm.data.ingest import ingest
from fm.data.validate import validate
from fm.paths import Paths
from tests.conftest import EN_DOCS, make_good_corpus

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("scale_corpus", REPO / "scripts" / "scale_corpus.py")
scale_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale_corpus)


def test_splice_joins_halves_at_whitespace():
    assert scale_corpus.splice("one two three four", "alpha beta gamma delta") == "one two gamma delta"
    assert scale_corpus.splice("床前明月光\n疑是地上霜\n举头望明月", "白日依山尽\n黄河入海流\n欲穷千里目") == "床前明月光\n黄河入海流\n欲穷千里目"
    assert scale_corpus.splice("abc", "xyz") == "ayz"  # no whitespace: the middle


def test_scaled_corpus_curates_to_factor_times_the_documents(tmp_path):
    raw = make_good_corpus(tmp_path / "raw")
    words = " ".join(EN_DOCS).split()
    en = [" ".join(random.Random(k).sample(words, 30)) for k in range(12)]  # enough documents to pair up
    (raw / "text" / "en.jsonl").write_text("".join(json.dumps({"text": t, "source": "fixture-en"}) + "\n" for t in en))
    out = tmp_path / "raw3"
    sizes = scale_corpus.scale(raw, out, factor=3)
    assert set(sizes) == {"text", "code", "image_text", "triples"}
    assert (out / "text" / "en.jsonl").read_bytes() == (raw / "text" / "en.jsonl").read_bytes()  # copy 0
    copy1 = [json.loads(line) for line in (out / "text" / "en" / "copy001.jsonl").read_text().splitlines()]
    assert {r["source"] for r in copy1} == {"fixture-en"} and len(copy1) == len(en)
    for record, original in zip(copy1, en):  # each starts as its own document and ends as another
        head = record["text"][:len(original) // 3]
        assert record["text"] != original and original.startswith(head)
    with pytest.raises(FileExistsError):
        scale_corpus.scale(raw, out, factor=2)

    counts = {}
    for name, corpus in (("1x", raw), ("3x", out)):
        paths = Paths(corpus, tmp_path / f"work-{name}")
        ingest(IngestConfig(), paths)
        validate(ValidateConfig(), paths)
        curate(CurateConfig(min_chars=1), paths)
        counts[name] = {m: pq.read_metadata(paths.curated / f"{m}.parquet").num_rows for m in ("image_text", "triples")}
        sources = pq.read_table(paths.curated / "text.parquet", columns=["source"])["source"].to_pylist()
        assert set(sources) <= {"fixture-en", "fixture-zh", "essay"}, set(sources)  # copies keep their source
        counts[name]["en"] = sources.count("fixture-en")
    # every spliced document, image and triple is new to curate (a lone document, joined to itself, is not)
    assert counts["1x"]["en"] == 12 and counts["3x"] == {k: 3 * v for k, v in counts["1x"].items()}
