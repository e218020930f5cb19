"""The run registry: `<workdir>/fm.duckdb`, a DuckDB index over the run's outputs and history.

    fm registry                        # rebuild it (e.g. after `dvc pull` restored the outputs)
    duckdb data/fm.duckdb "select * from stage_runs order by started desc limit 5"

It is derived, never a source of truth, so no stage owns it as a DVC output:
- one table per product a stage lists in its `tables` (corpus_stats from curate's stats.parquet,
  pretrain_loss from pretrain's loss.csv, ...), rebuilt from the files DVC versions, so a fresh
  clone gets them back with `dvc pull` then `fm registry`;
- `stage_runs`: one row per stage run or skip on this machine (when, how long, whether it was
  recorded in dvc.lock, its overrides and summary): history, like Prefect's own database.
"""

from __future__ import annotations

import json
import threading
import time

from fm.paths import Paths

_mutex = threading.Lock()  # parallel DAG branches of one run write here in turn (one writer per file)

RUNS_DDL = """
create table if not exists stage_runs (
    stage varchar, status varchar, started double, seconds double,
    recorded_in_dvc boolean, note varchar, overrides varchar, summary varchar
)"""


def _connect(paths: Paths):
    import duckdb

    paths.workdir.mkdir(parents=True, exist_ok=True)
    return duckdb.connect(str(paths.duckdb))


def refresh(paths: Paths, stages: list[str] | None = None) -> list[str]:
    """(Re)build the product tables of `stages` (all by default) from their files; returns the tables built."""
    from fm.stages import STAGES, resolve

    built = []
    with _mutex:
        con = _connect(paths)
        try:
            for name in stages or list(STAGES):
                for table, rel in STAGES[name].tables.items():
                    path = resolve(rel, paths)
                    if not path.is_file():
                        continue
                    reader = "read_parquet" if path.suffix == ".parquet" else "read_csv_auto"
                    con.execute(f"create or replace table {table} as select * from {reader}(?)", [str(path)])
                    built.append(table)
        finally:
            con.close()
    return built


def log_run(paths: Paths, stage: str, status: str, started: float, recorded: bool, note: str,
            overrides: list[str], summary: dict) -> None:
    """Append one row to stage_runs."""
    with _mutex:
        con = _connect(paths)
        try:
            con.execute(RUNS_DDL)
            con.execute("insert into stage_runs values (?, ?, ?, ?, ?, ?, ?, ?)",
                        [stage, status, started, round(time.time() - started, 3), recorded, note,
                         json.dumps(list(overrides)), json.dumps(summary, default=str, ensure_ascii=False)])
        finally:
            con.close()
