"""The data stages' partitions on a Dask cluster (issue 13): ingest's raw files mapped as Prefect tasks on a
2-worker local Dask cluster (prefect-dask), a few files a task, give the tables the in-process runner gives,
byte for byte.

    pytest tests/test_partitions.py
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fm.config import IngestConfig, PartitionsConfig
import fm.data.ingest as ingest_module
from fm.data.ingest import ingest
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
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def test_dask_runner_ingests_the_same_tables_as_the_local_one(tmp_path, monkeypatch):
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
