"""Ingest: the raw corpus contract, normalization, and every kind of bad record."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fm.config import IngestConfig
from fm.data.ingest import CorpusError, detect_lang, ingest, linearize_triple
from fm.data.schema import MODALITIES, SCHEMAS
from fm.paths import Paths


def read(paths: Paths, name: str):
    return pq.read_table(paths.ingested / f"{name}.parquet")


def test_good_corpus_all_modalities(good_corpus, tmp_path):
    paths = Paths(good_corpus, tmp_path / "work")
    summary = ingest(IngestConfig(image_size=16), paths)
    assert {m: c["kept"] for m, c in summary["counts"].items()} == {"text": 6, "code": 2, "image_text": 2, "triples": 3}
    assert all(c["quarantined"] == 0 for c in summary["counts"].values())
    for m in MODALITIES:
        assert read(paths, m).schema.equals(SCHEMAS[m], check_metadata=False)

    text = read(paths, "text").to_pylist()
    langs = {r["text"][:4]: r["lang"] for r in text}
    assert langs["The "] == "en" and langs["床前明月"] == "zh"
    jsonl_row = next(r for r in text if r["text"].startswith("Python"))
    assert (jsonl_row["source"], jsonl_row["source_file"], jsonl_row["position"]) == ("fixture-en", "text/en.jsonl", 2)
    txt_row = next(r for r in text if r["source_file"] == "text/essay.txt")
    assert txt_row["position"] == 0 and txt_row["n_bytes"] == len(txt_row["text"].encode())

    code = {r["lang"]: r for r in read(paths, "code").to_pylist()}
    assert set(code) == {"python", "c"}
    assert code["python"]["source"] == "lib"  # first folder under code/

    images = read(paths, "image_text").to_pylist()
    for r in images:
        im = Image.open(io.BytesIO(r["image"]))
        assert im.size == (16, 16) and im.mode == "RGB"
    blue = next(r for r in images if r["lang"] == "zh")
    px = Image.open(io.BytesIO(blue["image"])).getpixel((0, 8))
    assert px == (255, 255, 255)  # padded with white: a 20x40 image fit into a square

    triples = read(paths, "triples").to_pylist()
    paris = next(r for r in triples if r["subject"] == "Paris")
    assert paris["text"] == linearize_triple("Paris", "capital of", "France")
    assert paris["lang"] == "en" and paris["relation"] == "capital of"


def test_ids_are_stable_content_hashes(good_corpus, tmp_path):
    a = ingest(IngestConfig(), Paths(good_corpus, tmp_path / "a"))
    b = ingest(IngestConfig(), Paths(good_corpus, tmp_path / "b"))
    assert a["counts"] == b["counts"]
    for m in MODALITIES:
        ids_a = read(Paths(good_corpus, tmp_path / "a"), m)["id"].to_pylist()
        assert ids_a == read(Paths(good_corpus, tmp_path / "b"), m)["id"].to_pylist()
        assert len(set(ids_a)) == len(ids_a)


def test_bad_records_are_quarantined_with_reasons(bad_corpus, tmp_path):
    root, expected_bad = bad_corpus
    paths = Paths(root, tmp_path / "work")
    summary = ingest(IngestConfig(max_text_bytes=4096), paths)
    q = pq.read_table(paths.ingested / "quarantine.parquet").to_pylist()
    for m, c in summary["counts"].items():
        assert c["in"] == c["kept"] + c["quarantined"], m
        assert c["quarantined"] == expected_bad[m], (m, [r for r in q if r["modality"] == m])
    assert summary["counts"]["text"]["kept"] == 6  # the good records survive beside the bad ones

    reasons = {(r["source_file"], r["position"]): r["reason"] for r in q}
    assert reasons[("text/latin1.txt", 0)].startswith("bad utf-8 at byte 3")
    assert reasons[("text/empty.txt", 0)] == "empty text"
    assert reasons[("text/notes.docx", 0)].startswith("unknown file type")
    assert reasons[("text/link.txt", 0)].startswith("file outside the corpus")
    assert reasons[("text/broken.jsonl", 1)].startswith("malformed json")
    assert reasons[("text/broken.jsonl", 2)] == "missing or non-string field 'text'"
    assert reasons[("text/broken.jsonl", 4)].startswith("text too long")
    assert reasons[("code/bad.py", 0)].startswith("bad utf-8")
    manifest = "image_text/shapes/bad_manifest.jsonl"
    assert reasons[(manifest, 1)].startswith("unreadable image")
    assert reasons[(manifest, 2)].startswith("decompression bomb")
    assert reasons[(manifest, 3)].startswith("image too small")
    assert reasons[(manifest, 4)].startswith("unreadable image")
    assert reasons[(manifest, 5)].startswith("image path outside the corpus")
    assert reasons[(manifest, 6)].startswith("image path outside the corpus")
    assert reasons[(manifest, 7)].startswith("image not found")
    assert reasons[(manifest, 8)] == "empty caption"
    assert reasons[("triples/bad.tsv", 1)].startswith("malformed triple: 2 tab-separated columns")
    assert reasons[("triples/bad.tsv", 2)] == "malformed triple: missing relation"
    assert reasons[("triples/bad.jsonl", 1)] == "malformed triple: missing object"
    assert all(r["stage"] == "ingest" for r in q)


def test_missing_or_empty_corpus_is_one_line_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        ingest(IngestConfig(), Paths(tmp_path / "nope", tmp_path / "w"))
    (tmp_path / "empty" / "text").mkdir(parents=True)
    with pytest.raises(CorpusError, match="holds no files"):
        ingest(IngestConfig(), Paths(tmp_path / "empty", tmp_path / "w"))


def test_interrupted_ingest_leaves_no_output(good_corpus, tmp_path, monkeypatch):
    import fm.data.ingest as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "write_quarantine", boom)
    paths = Paths(good_corpus, tmp_path / "work")
    with pytest.raises(RuntimeError):
        ingest(IngestConfig(), paths)
    assert not paths.ingested.exists()
    assert not any(p.name.startswith(".tmp-") for p in paths.workdir.iterdir())


def test_detect_lang_groups_chinese_varieties():
    assert detect_lang("床前明月光，疑是地上霜。") == "zh"
    assert detect_lang("This sentence is written in plain English.") == "en"
