"""The run registry: `<workdir>/fm.duckdb`, a DuckDB index over the run's outputs and history.

    fm registry                        # rebuild it (e.g. after `dvc pull` restored the outputs)
    duckdb data/fm.duckdb "select * from stage_runs order by started desc limit 5"

It is derived, never a source of truth, so no stage owns it as a DVC output:
- one table per product a stage lists in its `tables` (corpus_stats from curate's stats.parquet,
  pretrain_loss from pretrain's loss.csv, ...), rebuilt from the files DVC versions, so a fresh
  clone gets them back with `dvc pull` then `fm registry`;
- `stage_runs`: one row per stage run or skip on this machine (when, how long, whether it was
  recorded in dvc.lock, its overrides and summary, its run's id): history, like Prefect's own database;
- `run_metrics`: the metric rows of each run in which a stage with `run_metrics` (evaluate) ran, under
  the run's id (`fm runs`, `fm compare RUN_A RUN_B`).
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
    recorded_in_dvc boolean, note varchar, overrides varchar, summary varchar, run_id varchar
)"""
RUN_METRICS_DDL = """
create table if not exists run_metrics (
    run_id varchar, stage varchar, model varchar, metric varchar, split varchar, value double, baseline double
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


def _ensure_tables(con) -> None:
    con.execute(RUNS_DDL)
    con.execute("alter table stage_runs add column if not exists run_id varchar")  # a registry from before run ids
    con.execute(RUN_METRICS_DDL)


def log_run(paths: Paths, stage: str, status: str, started: float, recorded: bool, note: str,
            overrides: list[str], summary: dict, run_id: str = "") -> None:
    """Append one row to stage_runs; when a stage with run metrics ran (evaluate), its metric rows go to
    run_metrics under run_id, so `fm compare` can set two runs side by side."""
    from fm.stages import STAGES, resolve

    with _mutex:
        con = _connect(paths)
        try:
            _ensure_tables(con)
            con.execute("insert into stage_runs (stage, status, started, seconds, recorded_in_dvc, note, overrides, "
                        "summary, run_id) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [stage, status, started, round(time.time() - started, 3), recorded, note,
                         json.dumps(list(overrides)), json.dumps(summary, default=str, ensure_ascii=False), run_id])
            metrics = STAGES[stage].run_metrics if stage in STAGES else ""
            if status == "ran" and metrics and resolve(metrics, paths).is_file():
                con.execute("delete from run_metrics where run_id = ? and stage = ?", [run_id, stage])
                con.execute("insert into run_metrics select ?, ?, model, metric, split, try_cast(value as double), "
                            "try_cast(baseline as double) from read_csv(?, all_varchar = true)",
                            [run_id, stage, str(resolve(metrics, paths))])
        finally:
            con.close()


def list_runs(paths: Paths, limit: int = 20) -> list[dict]:
    """The latest runs, newest first: run id, start, seconds, stages ran / skipped / failed, metric rows."""
    if not paths.duckdb.is_file():
        return []
    with _mutex:
        con = _connect(paths)
        try:
            _ensure_tables(con)
            rows = con.sql(f"""
                select r.run_id, min(r.started) as started, max(r.started + r.seconds) - min(r.started) as seconds,
                       count(*) filter (where r.status = 'ran') as ran,
                       count(*) filter (where r.status = 'skipped') as skipped,
                       count(*) filter (where r.status = 'failed') as failed,
                       (select count(*) from run_metrics m where m.run_id = r.run_id) as metrics
                from stage_runs r where coalesce(r.run_id, '') <> ''
                group by r.run_id order by started desc limit {int(limit)}""").fetchall()
        finally:
            con.close()
    keys = ("run_id", "started", "seconds", "ran", "skipped", "failed", "metrics")
    return [dict(zip(keys, row)) for row in rows]


def _resolve_run(con, ref: str) -> str:
    """A run id from a full id, a unique prefix, or `latest` / `latest~N` (N runs with metrics before it)."""
    with_metrics = [r[0] for r in con.sql("select run_id from run_metrics group by run_id "
                                          "order by min(rowid) desc").fetchall()]
    if ref == "latest" or ref.startswith("latest~"):
        back = int(ref[7:] or 0) if ref != "latest" else 0
        if back >= len(with_metrics):
            raise ValueError(f"{ref}: only {len(with_metrics)} run(s) with metrics in the registry")
        return with_metrics[back]
    matches = [r for r in with_metrics if r.startswith(ref)]
    if len(matches) != 1:
        raise ValueError(f"run {ref!r}: {'no run with metrics' if not matches else 'ambiguous'} "
                         f"(`fm runs` lists them; the evaluate stage must have run in it)")
    return matches[0]


def compare_runs(paths: Paths, a: str, b: str) -> tuple[str, str, list[dict]]:
    """(run a, run b, rows): every metric of either run's evaluation, its two values and b - a."""
    if not paths.duckdb.is_file():
        raise ValueError(f"{paths.duckdb} not found: no run has been recorded in this work dir")
    with _mutex:
        con = _connect(paths)
        try:
            _ensure_tables(con)
            run_a, run_b = _resolve_run(con, a), _resolve_run(con, b)
            rows = con.execute("""
                select coalesce(x.model, y.model), coalesce(x.metric, y.metric), coalesce(x.split, y.split),
                       x.value, y.value, y.value - x.value
                from (select * from run_metrics where run_id = ?) x
                full outer join (select * from run_metrics where run_id = ?) y
                  on x.model = y.model and x.metric = y.metric and x.split = y.split
                order by 1, 2, 3""", [run_a, run_b]).fetchall()
        finally:
            con.close()
    keys = ("model", "metric", "split", "a", "b", "diff")
    return run_a, run_b, [dict(zip(keys, row)) for row in rows]
