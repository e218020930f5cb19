"""Ingest streams (issue 13): its output does not depend on how rows are batched, a line or a file too
big to be a record is quarantined without being held whole, and its memory does not grow with the corpus.

    pytest tests/test_ingest_stream.py
"""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fm.data.ingest as ingest_module
from fm.config import IngestConfig, load_params
from fm.data.ingest import LongLine, ingest, source_lines
from fm.data.schema import MODALITIES
from fm.paths import Paths
from tests.conftest import make_bad_corpus, write_jsonl

CFG = IngestConfig(detect_lang=False, image_size=16)
TABLES = (*MODALITIES, "quarantine")
DOC = "a clean document that is long enough to keep"


def tables(paths: Paths) -> dict[str, list[dict]]:
    return {name: pq.read_table(paths.ingested / f"{name}.parquet").to_pylist() for name in TABLES}


def peak_bytes(run) -> int:
    """Peak Python heap allocated while `run()` runs (Arrow's own buffers are not traced)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module", autouse=True)
def warm_up(tmp_path_factory):
    """One ingest before any is measured, so that no lazy import counts towards a peak."""
    root = tmp_path_factory.mktemp("warm") / "raw"
    write_jsonl(root / "text" / "a.jsonl", [{"text": DOC}])
    ingest(CFG, Paths(root, root.parent / "work"))


# ---------------------------------------------------------------------------- row groups


@pytest.mark.parametrize("limit,value,most_rows", [("PARTITION_ROWS", 2, 2), ("ROW_GROUP_BYTES", 1, 1)])
def test_output_does_not_depend_on_the_row_group_size(tmp_path, monkeypatch, limit, value, most_rows):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "raw"
    make_bad_corpus(root, outside)  # good and bad records of every modality, so the quarantine too
    write_jsonl(root / "code" / "more.jsonl", [{"content": f"x = {i}\n", "path": "m.py"} for i in range(3)])
    write_jsonl(root / "image_text" / "shapes" / "more.jsonl", [{"image": "red.png", "caption": f"red {i}"} for i in range(3)])
    default = ingest(CFG, Paths(root, tmp_path / "default"))

    monkeypatch.setattr(ingest_module, limit, value)
    tiny = ingest(CFG, Paths(root, tmp_path / "tiny"))
    assert tiny["counts"] == default["counts"]
    assert tables(Paths(root, tmp_path / "tiny")) == tables(Paths(root, tmp_path / "default"))
    for m in MODALITIES:
        meta = pq.ParquetFile(tmp_path / "tiny" / "02_ingested" / f"{m}.parquet").metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert len(sizes) > 1 and max(sizes) == most_rows, (m, sizes)  # written as they came, not at the end


def test_a_failure_mid_stream_leaves_the_last_output_as_it_was(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    write_jsonl(root / "text" / "a.jsonl", [{"text": f"{DOC} {i}"} for i in range(10)])
    write_jsonl(root / "text" / "b.jsonl", [{"text": DOC}])
    paths = Paths(root, tmp_path / "work")
    ingest(CFG, paths)
    before = tables(paths)

    def fails_on_b(path, *args):
        if path.name == "b.jsonl":
            raise OSError("disk gone")
        return real(path, *args)

    real = ingest_module.count_records
    monkeypatch.setattr(ingest_module, "PARTITION_ROWS", 2)  # a.jsonl's row groups are on disk when b fails
    monkeypatch.setattr(ingest_module, "count_records", fails_on_b)
    with pytest.raises(RuntimeError, match=r"ingest failed on text file text/b\.jsonl: OSError: disk gone"):
        ingest(CFG, paths)
    assert tables(paths) == before
    assert sorted(p.name for p in paths.workdir.iterdir()) == ["02_ingested"]  # no temporary folder left


# ---------------------------------------------------------------------------- lines


def reference_lines(data: bytes) -> list[tuple[int, bytes]]:
    """What ingest read before it streamed: the whole file split at newlines, blank lines left out."""
    return [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"a", b"\xff", b" ", b"\t", b"\r", b"\n", b"\n", b"{}"]), max_size=60).map(b"".join),
       max_line_bytes=st.integers(1, 12), buffer_size=st.integers(1, 16))
def test_source_lines_match_a_whole_file_split(data, max_line_bytes, buffer_size):
    f = io.BufferedReader(io.BytesIO(data), buffer_size=buffer_size)  # lines that cross the read buffer too
    expected = [(n, line if len(line) <= max_line_bytes else LongLine(len(line))) for n, line in reference_lines(data)]
    assert list(source_lines(f, max_line_bytes)) == expected
    assert list(source_lines(data, max_line_bytes)) == expected


def test_a_huge_line_is_quarantined_without_being_held(tmp_path):
    huge = json.dumps({"text": "x" * 10_000_000})  # 10 MB
    root = tmp_path / "raw"
    (root / "text").mkdir(parents=True)
    with open(root / "text" / "a.jsonl", "w", encoding="utf-8", newline="") as f:
        f.write(json.dumps({"text": DOC + " 1"}) + "\n" + huge + "\n\n")  # a blank line is layout, not a record
        f.write(json.dumps({"text": DOC + " 4"}) + "\r\n" + json.dumps({"text": DOC + " 5"}))  # CRLF, then no last newline
    paths = Paths(root, tmp_path / "work")
    cfg = IngestConfig(detect_lang=False, max_line_bytes=1 << 16)

    peak = peak_bytes(lambda: ingest(cfg, paths))
    assert peak < 3_000_000, peak  # the 10 MB line was never held whole
    got = tables(paths)
    assert [(r["position"], r["text"]) for r in got["text"]] == [(1, DOC + " 1"), (4, DOC + " 4"), (5, DOC + " 5")]
    assert [(r["position"], r["reason"]) for r in got["quarantine"]] == [
        (2, f"line longer than ingest.max_line_bytes ({len(huge)} bytes > {1 << 16})")]
    assert ingest(cfg, paths)["counts"]["text"] == {"in": 4, "kept": 3, "quarantined": 1}


@pytest.mark.parametrize("modality,name", [("text", "big.txt"), ("code", "big.py")])
def test_a_one_record_file_too_big_is_quarantined_unread(tmp_path, modality, name):
    root = tmp_path / "raw"
    write_jsonl(root / "text" / "a.jsonl", [{"text": DOC}])
    size = 8_000_000
    (root / modality).mkdir(exist_ok=True)
    (root / modality / name).write_bytes(b"\xff" * size)  # read, it would be bad UTF-8 at byte 0
    paths = Paths(root, tmp_path / "work")
    cfg = IngestConfig(detect_lang=False, max_text_bytes=1_000_000)

    peak = peak_bytes(lambda: ingest(cfg, paths))
    assert peak < size / 4, peak
    assert [(r["source_file"], r["position"], r["reason"]) for r in tables(paths)["quarantine"]] == [
        (f"{modality}/{name}", 0, f"{modality} too long: {size} bytes > ingest.max_text_bytes=1000000")]


# ---------------------------------------------------------------------------- memory


def corpus_of(root: Path, n_records: int) -> Path:
    """One jsonl file of `n_records` short documents, and a triples file as long."""
    write_jsonl(root / "text" / "docs.jsonl", [{"text": f"{DOC} number {i}", "lang": "en"} for i in range(n_records)])
    (root / "triples").mkdir(parents=True)
    (root / "triples" / "facts.tsv").write_text("".join(f"thing {i}\tis a\tfact\ten\n" for i in range(n_records)))
    return root


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    n = 8_000  # more than schema.PARTITION_ROWS: the small corpus already fills a row group
    small, large = corpus_of(tmp_path / "small", n), corpus_of(tmp_path / "large", 4 * n)
    peak_small = peak_bytes(lambda: ingest(CFG, Paths(small, tmp_path / "work-small")))
    peak_large = peak_bytes(lambda: ingest(CFG, Paths(large, tmp_path / "work-large")))
    assert peak_large < 1.5 * peak_small, (peak_small, peak_large)
    assert pq.ParquetFile(tmp_path / "work-large" / "02_ingested" / "text.parquet").metadata.num_rows == 4 * n


def test_long_documents_wait_for_a_row_group_by_bytes_too(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "ROW_GROUP_BYTES", 1_000_000)  # 10 documents of 100 kB, far below PARTITION_ROWS
    peaks = []
    for n_docs in (40, 160):
        root = tmp_path / f"raw{n_docs}"
        (root / "code").mkdir(parents=True)
        for i in range(n_docs):
            (root / "code" / f"m{i:03d}.py").write_text(f"x = {i}\n" + "# a comment line of some length\n" * 3200)
        peaks.append(peak_bytes(lambda: ingest(CFG, Paths(root, tmp_path / f"work{n_docs}"))))
    assert peaks[1] < 1.5 * peaks[0], peaks  # held: 16 MB of source files if row groups waited for 4096 rows


# ---------------------------------------------------------------------------- the setting


def test_max_line_bytes_follows_max_text_bytes_unless_set():
    assert IngestConfig(max_text_bytes=1000).max_line_bytes == 3 * 1000 + (1 << 20)
    assert IngestConfig(max_text_bytes=1000, max_line_bytes=5).max_line_bytes == 5
    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml", ["ingest.max_text_bytes=10"])
    assert params.ingest.max_line_bytes == 30 + (1 << 20)
    with pytest.raises(ValueError, match="ingest.max_line_bytes must be positive, got -1"):
        IngestConfig(max_line_bytes=-1)
