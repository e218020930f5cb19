"""Validate streams: partition by partition, the same outputs as in one piece, in bounded memory.

The reference is the same stage with partitions larger than any table (one partition per
modality, what validate did before it streamed); tiny partitions (PARTITION_ROWS=2) must give
the same validated tables, quarantine and report, and the same gate.

    pytest tests/test_validate_stream.py
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fm.data.validate as validate_module
from fm.config import ValidateConfig
from fm.data.schema import MODALITIES, PARTITION_ROWS, SCHEMAS, content_id, quarantine_table
from fm.data.validate import ValidationGateError, validate
from fm.paths import Paths
from tests.conftest import png_bytes

GOOD = "a clean document that is long enough to keep"
# text rows that break the suite, by index: spread over several 2-row partitions, two in one
BAD_TEXT = {1: "fr", 4: "de", 5: "\x00", 9: "es", 12: ""}


def row(modality: str, position: int, text: str, lang: str = "en", **extra) -> dict:
    return {"id": content_id(modality, text, str(position)), "modality": modality, "source": "s",
            "source_file": f"{modality}/a.jsonl", "position": position, "lang": lang, "text": text,
            "n_bytes": len(text.encode()), "meta": None, **extra}


def text_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        bad = BAD_TEXT.get(i)
        if bad is None:
            rows.append(row("text", i + 1, f"{GOOD} number {i}"))
        elif len(bad) == 2:  # a language the suite does not allow
            rows.append(row("text", i + 1, f"{GOOD} in {bad} {i}", lang=bad))
        else:  # unclean or empty text
            rows.append(row("text", i + 1, f"{GOOD}{bad}" if bad else ""))
    return rows


def write_ingested(paths: Paths, rows: dict[str, list[dict]], row_group_size: int = PARTITION_ROWS) -> None:
    """Ingested tables written by hand, as a buggy reader upstream could leave them, plus ingest's quarantine."""
    paths.ingested.mkdir(parents=True)
    for m in MODALITIES:
        table = pa.Table.from_pylist(rows.get(m, []), schema=SCHEMAS[m])
        pq.write_table(table, paths.ingested / f"{m}.parquet", row_group_size=row_group_size)
    ingest_quarantine = quarantine_table([{"modality": "text", "source_file": "text/broken.jsonl", "position": 3,
                                           "stage": "ingest", "reason": "malformed JSON"}])
    pq.write_table(ingest_quarantine, paths.ingested / "quarantine.parquet")


@pytest.fixture
def corpus(tmp_path) -> Paths:
    """14 text rows (5 bad), 5 image_text rows (2 bad), 5 triples rows (1 bad), 3 code rows (1 bad)."""
    image = png_bytes()
    images = [row("image_text", i + 1, f"caption {i}", image=image, image_width=w, image_height=32)
              for i, w in enumerate([32, 4, 32, 32, 4])]  # 4 px: below validate.min_image_side
    triples = [row("triples", i + 1, f"s{i} r o", subject=f"s{i}", relation="" if i == 3 else "r", object="o") for i in range(5)]
    code = [row("code", i + 1, src, lang="python") for i, src in enumerate(["x = 1\n", "y = '\x1b'\n", "z = 3\n"])]
    paths = Paths(tmp_path / "raw", tmp_path / "work")
    # row groups of 3 rows: 2-row partitions then cross row group boundaries
    write_ingested(paths, {"text": text_rows(14), "image_text": images, "triples": triples, "code": code}, row_group_size=3)
    return paths


def copy_of(paths: Paths, name: str) -> Paths:
    other = Paths(paths.raw, paths.workdir.parent / name)
    shutil.copytree(paths.ingested, other.ingested)
    return other


def outputs(paths: Paths) -> dict:
    """Everything validate published: every table's rows in order, and the report."""
    out = {p.name: pq.read_table(p).to_pylist() for p in sorted(paths.validated.glob("*.parquet"))}
    out["report.json"] = json.loads((paths.validated / "report.json").read_text())
    return out


def test_tiny_partitions_give_the_same_outputs(corpus, monkeypatch):
    cfg = ValidateConfig(min_pass_rate=0.5)
    whole = copy_of(corpus, "whole")
    reference = validate(cfg, whole)
    monkeypatch.setattr(validate_module, "PARTITION_ROWS", 2)
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)
    streamed = validate(cfg, corpus)

    assert streamed["counts"] == reference["counts"]
    assert reference["counts"]["text"] == {"in": 14, "kept": 9, "quarantined": 5, "pass_rate": 0.6429}
    assert outputs(corpus) == outputs(whole)
    assert pq.read_table(corpus.validated / "text.parquet").schema.equals(pq.read_table(whole.validated / "text.parquet").schema)

    # Each failing row is quarantined as itself (its partition index mapped back to the right row).
    q = pq.read_table(corpus.validated / "quarantine.parquet").to_pylist()
    assert q[0]["stage"] == "ingest"  # the earlier stage's rows come first
    bad_text = [(r["position"], r["id"]) for r in q if r["modality"] == "text" and r["stage"] == "validate"]
    assert bad_text == [(i + 1, text_rows(14)[i]["id"]) for i in sorted(BAD_TEXT)]
    assert {(r["modality"], r["position"]) for r in q if r["modality"] != "text"} == {
        ("image_text", 2), ("image_text", 5), ("triples", 4), ("code", 2)}

    # The report sums over partitions, its examples the first five over all of them in order.
    report = json.loads((corpus.validated / "report.json").read_text())["expectations"]
    langs = next(e for e in report["text"] if e["expectation"] == "expect_column_values_to_be_in_set(lang)")
    assert langs == {"expectation": "expect_column_values_to_be_in_set(lang)", "success": False,
                     "unexpected_count": 3, "unexpected_examples": ["fr", "de", "es"]}
    assert sum(not e["success"] for e in report["text"]) == 4  # lang, regex, lengths, n_bytes

    # The kept rows were written as they came: a row group per tiny partition.
    kept = pq.ParquetFile(corpus.validated / "text.parquet")
    assert kept.num_row_groups > 4
    assert max(kept.metadata.row_group(i).num_rows for i in range(kept.num_row_groups)) <= 2


def test_partitions_hold_a_bounded_amount_of_text_however_long_the_rows(tmp_path, monkeypatch):
    """Rows count is no bound on GX's memory when documents are long (a 57 MB batch at 30x): partitions also stop at
    about GX_BATCH_BYTES of text, a row longer than that alone; the outputs are those of one partition."""
    lengths = [10, 10, 900, 10, 2500, 10, 10, 10, 400, 400, 400, 10]
    texts = [f"{GOOD} {i} " + "x" * n for i, n in enumerate(lengths)]
    texts[3] = ""  # broken, so the quarantine and report are compared too
    paths = Paths(tmp_path / "raw", tmp_path / "parts")
    write_ingested(paths, {"text": [row("text", i + 1, t) for i, t in enumerate(texts)]}, row_group_size=5)
    whole = copy_of(paths, "whole")
    cfg = ValidateConfig(min_pass_rate=0.0)
    validate(cfg, whole)

    monkeypatch.setattr(validate_module, "GX_BATCH_BYTES", 1500)
    monkeypatch.setattr(validate_module, "ROW_BYTES", 100)
    ranges = validate_module.partition_ranges(paths.ingested / "text.parquet")
    assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]] and ranges[-1][1] == len(texts)
    sizes = [len(t.encode()) + 100 for t in texts]
    for start, stop in ranges:
        assert stop - start == 1 or sum(sizes[start:stop]) <= 1500, (start, stop)
        assert stop == len(texts) or sum(sizes[start:stop + 1]) > 1500  # as many rows as fit
    assert (4, 5) in ranges and len(ranges) >= 4  # the 2,500-byte row alone
    monkeypatch.setattr(validate_module, "validate_partition", counted := CountCalls(validate_module.validate_partition))
    validate(cfg, paths)
    assert counted.calls == len(ranges)
    assert outputs(paths) == outputs(whole)


class CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_gate_counts_all_partitions_then_publishes_nothing(corpus, monkeypatch):
    monkeypatch.setattr(validate_module, "PARTITION_ROWS", 2)
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)
    # 64% of text passes: the gate is on the whole modality, although no row of one partition (rows 4, 5) does
    validate(ValidateConfig(min_pass_rate=0.6), corpus)
    assert corpus.validated.exists()

    with pytest.raises(ValidationGateError, match=r"min_pass_rate=70% for text 64\.3%, code 66\.7%, image_text 60\.0%;"):
        validate(ValidateConfig(min_pass_rate=0.7), corpus)
    assert not corpus.validated.exists()  # the stale output is gone too
    assert sorted(p.name for p in corpus.workdir.iterdir()) == ["02_ingested", "validate_failed.json"]  # no temporary folder
    failed = json.loads((corpus.workdir / "validate_failed.json").read_text())
    assert failed["counts"]["text"] == {"in": 14, "kept": 9, "quarantined": 5, "pass_rate": 0.6429}
    assert failed["min_pass_rate"] == 0.7 and set(failed["expectations"]) == set(MODALITIES)

    validate(ValidateConfig(min_pass_rate=0.6), corpus)  # a passing run clears the failure
    assert not (corpus.workdir / "validate_failed.json").exists()


def test_an_error_mid_stream_keeps_the_last_good_output(corpus, monkeypatch):
    validate(ValidateConfig(min_pass_rate=0.5), corpus)
    before = outputs(corpus)
    monkeypatch.setattr(validate_module, "PARTITION_ROWS", 2)
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)
    calls = []
    real = validate_module.validate_partition

    def fail_on_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("GX broke")
        return real(*args)

    monkeypatch.setattr(validate_module, "validate_partition", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="GX broke"):
        validate(ValidateConfig(min_pass_rate=0.5), corpus)
    assert outputs(corpus) == before
    assert sorted(p.name for p in corpus.workdir.iterdir()) == ["02_ingested", "03_validated"]


def traced_peak(paths: Paths) -> int:
    tracemalloc.start()
    try:
        validate(ValidateConfig(min_pass_rate=0.0), paths)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)  # batches of PARTITION_ROWS, below both tables
    def corpus_of(n: int) -> Paths:
        paths = Paths(tmp_path / "raw", tmp_path / f"n{n}")
        rows = [row("text", i + 1, f"document {i:06d} " + "lorem ipsum dolor sit amet " * 7) for i in range(n)]  # ~200 chars
        write_ingested(paths, {"text": rows})
        return paths

    traced_peak(corpus_of(100))  # GX's one-time setup and caches, outside the comparison
    small, large = traced_peak(corpus_of(8_000)), traced_peak(corpus_of(32_000))
    # Reading the whole table grows ~4x here; one partition at a time, barely at all.
    assert large < 1.5 * small, (small, large)
