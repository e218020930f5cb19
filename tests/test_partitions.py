"""The data stages' partitions on a Dask cluster (issue 13): ingest's raw files (a few files a task) and
validate's row ranges, mapped as Prefect tasks on a 2-worker local Dask cluster (prefect-dask), give the
tables, quarantine and report the in-process runner gives, byte for byte.

    pytest tests/test_partitions.py
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fm.config import IngestConfig, PartitionsConfig, ValidateConfig
import fm.data.ingest as ingest_module
import fm.data.validate as validate_module
from fm.data.ingest import ingest
from fm.data.validate import validate
from fm.data.partitions import map_partitions
from fm.paths import Paths
from tests.conftest import make_bad_corpus


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def test_local_runner_maps_in_order_in_this_process():
    got = map_partitions(_pid_and_square, range(5), PartitionsConfig(), name="test")
    assert got == [(os.getpid(), x * x) for x in range(5)]
    assert map_partitions(_pid_and_square, [], PartitionsConfig(runner="dask"), name="test") == []  # nothing to start
    with pytest.raises(ValueError, match="partitions.runner must be local or dask"):
        PartitionsConfig(runner="ray")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_dask_runner_ingests_and_validates_the_same_tables_as_the_local_one(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    outside = tmp_path / "outside"
    outside.mkdir()
    make_bad_corpus(raw, outside)  # good and bad records: kept rows and quarantine both compared
    local = Paths(raw, tmp_path / "local")
    ingest(IngestConfig(max_text_bytes=4096), local)
    mapped = Paths(raw, tmp_path / "dask")
    monkeypatch.setattr(ingest_module, "PARTITION_FILES", 3)  # several tasks of several files each
    summary = ingest(IngestConfig(max_text_bytes=4096), mapped, PartitionsConfig(runner="dask", dask_workers=2))
    assert digests(mapped.ingested) == digests(local.ingested)
    assert pq.read_table(mapped.ingested / "quarantine.parquet").num_rows > 5
    assert summary["counts"]["text"]["kept"] > 0
    assert not [p for p in mapped.workdir.iterdir() if p.name.startswith(".tmp-")]  # the partitions' files are gone

    # validate: row ranges of each table, several a modality, on the cluster; joined in order
    dask = PartitionsConfig(runner="dask", dask_workers=2)
    monkeypatch.setattr(validate_module, "PARTITION_ROWS", 2)
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)
    cfg = ValidateConfig(min_pass_rate=0.0, allowed_langs=("en",))  # the other languages fail an expectation
    validate(cfg, local)
    summary = validate(cfg, mapped, dask)
    assert digests(mapped.validated) == digests(local.validated)  # tables, quarantine and report.json
    assert {p.name for p in mapped.validated.iterdir()} == {p.name for p in local.validated.iterdir()}
    assert summary["counts"]["text"]["in"] > 2 * 2  # more than two partitions of text
    assert pq.read_table(mapped.validated / "quarantine.parquet").num_rows > pq.read_table(
        mapped.ingested / "quarantine.parquet").num_rows  # validate quarantined rows of its own
    assert not [p for p in mapped.workdir.iterdir() if p.name.startswith(".tmp-")]


def test_a_partition_that_fails_on_a_worker_leaves_the_last_validated_output(tmp_path, monkeypatch):
    """The join path of the Dask runner, with the map run here: the third partition's task raises, so the stage
    fails, its parts and temporary folder are gone, and the previous 03_validated stays as it was."""
    import fm.data.partitions as partitions_module

    raw, outside = tmp_path / "raw", tmp_path / "outside"
    outside.mkdir()
    make_bad_corpus(raw, outside)
    paths = Paths(raw, tmp_path / "work")
    ingest(IngestConfig(max_text_bytes=4096), paths)
    cfg = ValidateConfig(min_pass_rate=0.0)
    validate(cfg, paths)
    before = digests(paths.validated)
    monkeypatch.setattr(validate_module, "PARTITION_ROWS", 2)
    monkeypatch.setattr(validate_module, "GX_BATCH_PARTITIONS", 1)
    ran = []

    def in_process(work, items, cfg, name):
        def task(item):
            ran.append(item)
            if len(ran) == 3:
                raise RuntimeError("worker lost")
            return work(item)
        return [task(item) for item in items]

    monkeypatch.setattr(partitions_module, "map_partitions", in_process)
    with pytest.raises(RuntimeError, match="worker lost"):
        validate(cfg, paths, PartitionsConfig(runner="dask"))
    assert len(ran) == 3 and digests(paths.validated) == before
    assert not [p for p in paths.workdir.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".arrow"]
