"""The run registry: `<workdir>/fm.duckdb`, a DuckDB index over the run's outputs and history.

    fm registry                        # rebuild it (e.g. after `dvc pull` restored the outputs)
    duckdb data/fm.duckdb "select * from stage_runs order by started desc limit 5"

It is derived, never a source of truth, so no stage owns it as a DVC output:
- one table per product a stage lists in its `tables` (corpus_stats from curate's stats.parquet,
  pretrain_loss from pretrain's loss.csv, ...), rebuilt from the files DVC versions, so a fresh
  clone gets them back with `dvc pull` then `fm registry`;
- `shard_catalog`: one row per file of the token shards (shard's manifest.json: path, kind, modality,
  sha256, bytes, tokens, documents, mix and token_mix as JSON, the tokenizer's and the manifest's sha256);
- `stage_runs`: one row per stage run or skip on this machine (when, how long, whether it was
  recorded in dvc.lock, its overrides and summary, its run's id): history, like Prefect's own database.
  A run or failure also keeps `params` (JSON {section: effective settings} of the sections the stage
  read); a run keeps `inputs` and `outputs` (JSON {dep or out as the stage table names it: its
  `content_hash`, null when missing}), so two runs of a stage show what changed (`fm runs --stages ID`);
- `run_metrics`: the metric rows of each run in which a stage with `run_metrics` (evaluate) ran, under
  the run's id (`fm runs`, `fm compare RUN_A RUN_B`).

Being derived, a damaged registry (cut short, overwritten, failing DuckDB's block checksums) never stops a
run: it is set aside as `fm.duckdb.damaged-<time>` with a note on stderr, and a new one starts with its
product tables rebuilt from the outputs (the old run history stays in the set-aside file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from fm.io import cached_sha256
from fm.paths import Paths

_mutex = threading.Lock()  # parallel DAG branches of one run write here in turn (one writer per file)
RUNS_DDL = """
create table if not exists stage_runs (
    stage varchar, status varchar, started double, seconds double,
    recorded_in_dvc boolean, note varchar, overrides varchar, summary varchar, run_id varchar,
    params varchar, inputs varchar, outputs varchar
)"""
# Columns added since the first registry, added in place to an older one (see _ensure_tables).
RUNS_ADDED_COLUMNS = ("run_id", "params", "inputs", "outputs")
SHARD_CATALOG_SCHEMA = [("path", "string"), ("kind", "string"), ("modality", "string"), ("sha256", "string"),
                        ("bytes", "int64"), ("tokens", "int64"), ("documents", "int64"), ("mix", "string"),
                        ("token_mix", "string"), ("tokenizer_sha256", "string"), ("manifest_sha256", "string")]
RUN_METRICS_DDL = """
create table if not exists run_metrics (
    run_id varchar, stage varchar, model varchar, metric varchar, split varchar, value double, baseline double
)"""


# What DuckDB says of a registry file cut short, overwritten or failing its block checksums (found on opening
# it, reading a block or writing a checkpoint). A lock held by another process or a permission problem is not damage.
DAMAGED = ("not a valid DuckDB database", "Corrupt database file", "Could not read enough bytes from file")


def _damaged(e: BaseException, paths: Paths) -> bool:
    import duckdb

    text = str(e)
    return isinstance(e, duckdb.Error) and any(s in text for s in DAMAGED) and (
        "Could not read enough bytes" not in text or paths.duckdb.name in text)


def _set_aside(paths: Paths, e: BaseException) -> Path:
    """Move a damaged registry (and its write-ahead log) out of the way, saying where it went."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    while (aside := paths.duckdb.with_name(f"{paths.duckdb.name}.damaged-{stamp}" + (f"-{n}" if n > 1 else ""))).exists():
        n += 1  # an earlier one set aside this second is kept too
    os.replace(paths.duckdb, aside)
    wal = paths.duckdb.with_name(paths.duckdb.name + ".wal")
    if wal.exists():  # DuckDB would replay the damaged file's log into the new one
        os.replace(wal, aside.with_name(aside.name + ".wal"))
    print(f"fm: {paths.duckdb} is damaged ({str(e).splitlines()[0]}): set aside as {aside}; a new registry starts, "
          f"its tables rebuilt from the stage outputs (the run history stays in the old file)", file=sys.stderr)
    return aside


def _with_registry(paths: Paths, work: Callable, must_exist: bool = False):
    """work(con) on the registry, its tables ensured, under the process's writer lock. The registry is derived,
    so a damaged file never stops a run: it is set aside and work runs again on a new registry whose product
    tables are rebuilt from the stage outputs."""
    import duckdb

    if must_exist and not paths.duckdb.is_file():
        raise ValueError(f"{paths.duckdb} not found: no run has been recorded in this work dir")
    paths.workdir.mkdir(parents=True, exist_ok=True)
    with _mutex:
        for again in (False, True):
            try:
                con = duckdb.connect(str(paths.duckdb))
                try:
                    _ensure_tables(con)
                    if again:
                        _build_tables(con, paths, None, notes=True)
                    result = work(con)
                    con.execute("checkpoint")  # into the file now: closing would swallow a failure to write it
                    return result
                finally:
                    con.close()
            except duckdb.Error as e:
                if again or not _damaged(e, paths):
                    raise
                _set_aside(paths, e)


def content_hash(path: Path) -> str | None:
    """The content hash of a stage's dep or out: a file's sha256; for a directory, the sha256 of its
    files' sorted (relative POSIX path, sha256) pairs, one `path NUL sha256 LF` line each, skipping the
    `.tmp-*` leftovers of writes in progress (and whatever lies under them); None when it does not exist."""
    path = Path(path)
    if path.is_file():
        return cached_sha256(str(path))
    if not path.is_dir():
        return None
    pairs = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]
        for name in files:
            file = os.path.join(folder, name)
            if name.startswith(".tmp-") or not os.path.isfile(file):  # a broken link or a socket has no content
                continue
            try:
                pairs.append((Path(os.path.relpath(file, path)).as_posix(), cached_sha256(file)))
            except FileNotFoundError:  # renamed away under us (an atomic write replacing it); not part of the output
                continue
    digest = hashlib.sha256()
    for rel, sha in sorted(pairs):
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()


def stage_params(params, stage: str) -> dict:
    """{section: its effective settings} of the params sections `stage` reads (the `params` column)."""
    from fm.stages import STAGES

    return {section: dataclasses.asdict(getattr(params, section)) for section in STAGES[stage].sections}


def stage_hashes(paths: Paths, stage: str) -> tuple[dict, dict]:
    """({dep: content_hash}, {out: content_hash}) of `stage`, keyed as its entry in fm/stages.py names them."""
    from fm.stages import STAGES, resolve

    spec = STAGES[stage]
    return ({rel: content_hash(resolve(rel, paths)) for rel in spec.deps},
            {rel: content_hash(resolve(rel, paths)) for rel in spec.outs})


def _shard_catalog(path: Path):
    """The rows of shard_catalog from a shard manifest.json: one per file it lists."""
    import pyarrow as pa

    data = path.read_bytes()
    as_json = lambda v: None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)  # noqa: E731
    try:
        manifest = json.loads(data)
        tokenizer_sha256, manifest_sha256 = manifest["tokenizer"]["sha256"], hashlib.sha256(data).hexdigest()
        rows = [{"path": f["path"], "kind": f["kind"], "modality": f.get("modality"), "sha256": f["sha256"],
                 "bytes": f["bytes"], "tokens": f.get("tokens"), "documents": f.get("documents"),
                 "mix": as_json(f.get("mix")), "token_mix": as_json(f.get("token_mix")),
                 "tokenizer_sha256": tokenizer_sha256, "manifest_sha256": manifest_sha256} for f in manifest["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ValueError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e}); "
                         f"`fm shard --force` writes it again") from e
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SHARD_CATALOG_SCHEMA])
    return pa.Table.from_pylist(rows, schema=schema)


def refresh(paths: Paths, stages: list[str] | None = None) -> list[str]:
    """(Re)build the product tables of `stages` (all by default) from their files; returns the tables built."""
    return _with_registry(paths, lambda con: _build_tables(con, paths, stages))


def _build_tables(con, paths: Paths, stages: list[str] | None, notes: bool = False) -> list[str]:
    """The product tables of `stages` from their files; a file that cannot be read is a ValueError naming it
    (with `notes`, a line on stderr instead: rebuilding a set-aside registry skips it)."""
    import duckdb

    from fm.stages import STAGES, resolve

    built = []
    for name in stages or list(STAGES):
        for table, rel in STAGES[name].tables.items():
            path = resolve(rel, paths)
            if not path.is_file():
                continue
            try:
                if path.name == "manifest.json":
                    con.register("manifest_rows", _shard_catalog(path))
                    con.execute(f"create or replace table {table} as select * from manifest_rows")
                    con.unregister("manifest_rows")
                else:
                    reader = "read_parquet" if path.suffix == ".parquet" else "read_csv_auto"
                    try:
                        con.execute(f"create or replace table {table} as select * from {reader}(?)", [str(path)])
                    except duckdb.Error as e:
                        if _damaged(e, paths):
                            raise
                        raise ValueError(f"{path} cannot be read into the registry's {table} table "
                                         f"({str(e).splitlines()[0]}): rerun `fm {name}`") from None
            except ValueError as e:
                if not notes:
                    raise
                print(f"fm: registry table {table} not rebuilt: {e}", file=sys.stderr)
                continue
            built.append(table)
    return built


def _ensure_tables(con) -> None:
    con.execute(RUNS_DDL)
    for column in RUNS_ADDED_COLUMNS:  # a registry from before these columns keeps working
        con.execute(f"alter table stage_runs add column if not exists {column} varchar")
    con.execute(RUN_METRICS_DDL)


def log_run(paths: Paths, stage: str, status: str, started: float, recorded: bool, note: str,
            overrides: list[str], summary: dict, run_id: str = "", params: dict | None = None) -> None:
    """Append one row to stage_runs, with `params` ({section: settings} the stage read) and, when it ran,
    the content hashes of its deps and outs; when a stage with run metrics ran (evaluate), its metric
    rows go to run_metrics under run_id, so `fm compare` can set two runs side by side."""
    from fm.stages import STAGES, resolve

    seconds = round(time.time() - started, 3)  # the stage's time, not the hashing's
    inputs = outputs = None
    if status == "ran" and stage in STAGES:  # hashed outside the lock: parallel branches need not wait on it
        inputs, outputs = (json.dumps(h) for h in stage_hashes(paths, stage))
    params_json = None if params is None else json.dumps(params, default=str, ensure_ascii=False)

    def insert(con) -> None:
        con.execute("insert into stage_runs (stage, status, started, seconds, recorded_in_dvc, note, overrides, "
                    "summary, run_id, params, inputs, outputs) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [stage, status, started, seconds, recorded, note, json.dumps(list(overrides)),
                     json.dumps(summary, default=str, ensure_ascii=False), run_id, params_json, inputs, outputs])
        metrics = STAGES[stage].run_metrics if stage in STAGES else ""
        if status == "ran" and metrics and resolve(metrics, paths).is_file():
            con.execute("delete from run_metrics where run_id = ? and stage = ?", [run_id, stage])
            con.execute("insert into run_metrics select ?, ?, model, metric, split, try_cast(value as double), "
                        "try_cast(baseline as double) from read_csv(?, all_varchar = true)",
                        [run_id, stage, str(resolve(metrics, paths))])

    _with_registry(paths, insert)


def list_runs(paths: Paths, limit: int = 20) -> list[dict]:
    """The latest runs, newest first: run id, start, seconds, stages ran / skipped / failed, metric rows."""
    if not paths.duckdb.is_file():
        return []
    rows = _with_registry(paths, lambda con: con.execute("""
            select r.run_id, min(r.started) as started, max(r.started + r.seconds) - min(r.started) as seconds,
                   count(*) filter (where r.status = 'ran') as ran,
                   count(*) filter (where r.status = 'skipped') as skipped,
                   count(*) filter (where r.status = 'failed') as failed,
                   (select count(*) from run_metrics m where m.run_id = r.run_id) as metrics
            from stage_runs r where coalesce(r.run_id, '') <> ''
            group by r.run_id order by started desc limit ?""", [int(limit)]).fetchall())
    keys = ("run_id", "started", "seconds", "ran", "skipped", "failed", "metrics")
    return [dict(zip(keys, row)) for row in rows]


def _resolve_run(con, ref: str, with_metrics: bool = True) -> str:
    """A run id from a full id, a unique prefix, or `latest` / `latest~N` (N runs before it), among the
    runs with metrics (`fm compare`) or, with `with_metrics=False`, every run in stage_runs."""
    if with_metrics:
        runs = [r[0] for r in con.execute("select run_id from run_metrics group by run_id "
                                          "order by min(rowid) desc").fetchall()]
        kind, hint = " with metrics", "; the evaluate stage must have run in it"
    else:
        runs = [r[0] for r in con.execute("select run_id from stage_runs where coalesce(run_id, '') <> '' "
                                          "group by run_id order by min(started) desc").fetchall()]
        kind, hint = "", ""
    if ref == "latest" or ref.startswith("latest~"):
        back = int(ref[7:] or 0) if ref != "latest" else 0
        if back >= len(runs):
            raise ValueError(f"{ref}: only {len(runs)} run(s){kind} in the registry")
        return runs[back]
    matches = [r for r in runs if r.startswith(ref)]
    if len(matches) != 1:
        raise ValueError(f"run {ref!r}: {f'no run{kind}' if not matches else 'ambiguous'} "
                         f"(`fm runs` lists them{hint})")
    return matches[0]


def run_stages(paths: Paths, ref: str) -> list[dict]:
    """The stage rows of one run (a full id, a unique prefix, `latest` or `latest~N`), in the order they
    started, with params, inputs and outputs decoded from JSON (None where not recorded)."""
    def select(con) -> list[tuple]:
        run_id = _resolve_run(con, ref, with_metrics=False)
        return con.execute("select run_id, stage, status, started, seconds, recorded_in_dvc, note, params, inputs, "
                           "outputs from stage_runs where run_id = ? order by started, rowid", [run_id]).fetchall()

    rows = _with_registry(paths, select, must_exist=True)
    keys = ("run_id", "stage", "status", "started", "seconds", "recorded", "note", "params", "inputs", "outputs")
    decoded = lambda v: None if v is None else json.loads(v)  # noqa: E731
    return [{**dict(zip(keys, row)), **{k: decoded(v) for k, v in zip(keys[7:], row[7:])}} for row in rows]


def compare_runs(paths: Paths, a: str, b: str) -> tuple[str, str, list[dict]]:
    """(run a, run b, rows): every metric of either run's evaluation, its two values and b - a."""
    def select(con) -> tuple[str, str, list[tuple]]:
        run_a, run_b = _resolve_run(con, a), _resolve_run(con, b)
        return run_a, run_b, con.execute("""
            select coalesce(x.model, y.model), coalesce(x.metric, y.metric), coalesce(x.split, y.split),
                   x.value, y.value, y.value - x.value
            from (select * from run_metrics where run_id = ?) x
            full outer join (select * from run_metrics where run_id = ?) y
              on x.model = y.model and x.metric = y.metric and x.split = y.split
            order by 1, 2, 3""", [run_a, run_b]).fetchall()

    run_a, run_b, rows = _with_registry(paths, select, must_exist=True)
    keys = ("model", "metric", "split", "a", "b", "diff")
    return run_a, run_b, [dict(zip(keys, row)) for row in rows]
