"""Validate: Great Expectations suites per modality, quarantine by row, and the pass-rate gate."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm.config import IngestConfig, ValidateConfig
from fm.data.ingest import ingest
from fm.data.validate import ValidationGateError, validate
from fm.paths import Paths
from tests.conftest import write_jsonl


@pytest.fixture
def ingested(good_corpus, tmp_path):
    # Two French documents: `validate.allowed_langs` is en/zh, so they must fail.
    write_jsonl(good_corpus / "text" / "fr.jsonl", [
        {"text": "Le renard brun saute par-dessus le chien paresseux dans la cour de la ferme."},
        {"text": "Une base de données relationnelle stocke les informations dans des tables.", "lang": "fr"},
    ])
    (good_corpus / "text" / "empty.txt").write_text("", encoding="utf-8")  # quarantined by ingest
    paths = Paths(good_corpus, tmp_path / "work")
    ingest(IngestConfig(), paths)
    return paths


def test_failing_rows_go_to_quarantine_with_the_expectation(ingested):
    summary = validate(ValidateConfig(min_pass_rate=0.5), ingested)
    assert summary["counts"]["text"] == {"in": 8, "kept": 6, "quarantined": 2, "pass_rate": 0.75}
    for m in ("code", "image_text", "triples"):
        assert summary["counts"][m]["quarantined"] == 0

    q = pq.read_table(ingested.validated / "quarantine.parquet").to_pylist()
    by_stage = {s: [r for r in q if r["stage"] == s] for s in ("ingest", "validate")}
    assert len(by_stage["ingest"]) == 1  # carried over from ingest: the quarantine is cumulative
    assert {r["source_file"] for r in by_stage["validate"]} == {"text/fr.jsonl"}
    assert all("expect_column_values_to_be_in_set(lang" in r["reason"] for r in by_stage["validate"])
    assert all(r["id"] for r in by_stage["validate"])

    kept = pq.read_table(ingested.validated / "text.parquet")
    assert set(kept["lang"].to_pylist()) <= {"en", "zh"}
    report = json.loads((ingested.validated / "report.json").read_text())
    failed = [e for e in report["expectations"]["text"] if not e["success"]]
    assert len(failed) == 1 and failed[0]["unexpected_count"] == 2


def test_gate_fails_and_rolls_back(ingested):
    validate(ValidateConfig(min_pass_rate=0.5), ingested)
    assert ingested.validated.exists()
    with pytest.raises(ValidationGateError, match=r"text 75\.0%"):
        validate(ValidateConfig(min_pass_rate=0.9), ingested)
    assert not ingested.validated.exists()  # no stale output a later stage could take for good
    failed = json.loads((ingested.workdir / "validate_failed.json").read_text())
    assert failed["counts"]["text"]["pass_rate"] == 0.75


def test_every_modality_suite_catches_its_own_faults(ingested):
    # Corrupt ingested rows directly: what a buggy reader upstream could produce.
    path = ingested.ingested / "triples.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("relation"), "relation", pa.array(["", "hypernym", "首都"]))
    pq.write_table(t, path)
    path = ingested.ingested / "image_text.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("image_width"), "image_width", pa.array([4, 64], pa.int32()))
    pq.write_table(t, path)
    summary = validate(ValidateConfig(min_pass_rate=0.0), ingested)
    assert summary["counts"]["triples"]["quarantined"] == 1
    assert summary["counts"]["image_text"]["quarantined"] == 1
    q = pq.read_table(ingested.validated / "quarantine.parquet").to_pylist()
    reasons = {r["modality"]: r["reason"] for r in q if r["stage"] == "validate" and r["modality"] != "text"}
    assert "expect_column_value_lengths_to_be_between(relation" in reasons["triples"]
    assert "expect_column_values_to_be_between(image_width" in reasons["image_text"]


def test_validate_without_ingest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fm ingest` first"):
        validate(ValidateConfig(), Paths(tmp_path / "raw", tmp_path / "work"))
