"""The run registry (fm/registry.py): content hashes, stage_runs' params/inputs/outputs columns, an old
registry's upgrade, the shard_catalog table, `run_stages` and `fm runs --stages`. No pipeline run:
log_run and refresh are called on small hand-written files.

    .venv/bin/python -m pytest -p no:logging tests/test_registry.py -q
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import duckdb
import pytest
from typer.testing import CliRunner

import fm.io
from fm import registry
from fm.cli import app
from fm.config import Params
from fm.paths import Paths


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_hash(files: dict[str, bytes]) -> str:
    """The reference directory hash, written out from content_hash's docstring."""
    return sha(b"".join(f"{rel}\0{sha(data)}\n".encode() for rel, data in sorted(files.items())))


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths(tmp_path / "raw", tmp_path / "work")


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def columns(paths: Paths, table: str) -> list[str]:
    con = duckdb.connect(str(paths.duckdb))
    try:
        return [r[0] for r in con.execute(f"describe {table}").fetchall()]
    finally:
        con.close()


def fetch(paths: Paths, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(paths.duckdb))
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# ---------------------------------------------------------------- content_hash

def test_content_hash_of_a_file_is_its_sha256(tmp_path):
    data = os.urandom(5000)
    write(tmp_path / "f.bin", data)
    assert registry.content_hash(tmp_path / "f.bin") == sha(data)


def test_content_hash_of_a_directory_and_what_changes_it(tmp_path):
    root = tmp_path / "d"
    files = {"a.txt": b"alpha", "sub/b.txt": b"beta", "sub/deeper/c.bin": b"\x00\x01"}
    for rel, data in files.items():
        write(root / rel, data)
    before = registry.content_hash(root)
    assert before == dir_hash(files)

    # a write in progress (fm.io's `.tmp-*` files and folders) is not part of the output
    write(root / ".tmp-x", b"partial")
    write(root / "sub" / ".tmp-1234abcd-part" / "inner.bin", b"partial")
    assert registry.content_hash(root) == before

    # same length, new bytes, a later mtime: the hash follows the content
    b = root / "sub" / "b.txt"
    b.write_bytes(b"BETA")
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = registry.content_hash(root)
    assert after == dir_hash({**files, "sub/b.txt": b"BETA"}) and after != before

    # a renamed file is a different directory, though every byte is the same
    (root / "a.txt").rename(root / "a2.txt")
    renamed = {"a2.txt": b"alpha", "sub/b.txt": b"BETA", "sub/deeper/c.bin": b"\x00\x01"}
    assert registry.content_hash(root) == dir_hash(renamed)


def test_content_hash_of_a_missing_path_is_none(tmp_path):
    assert registry.content_hash(tmp_path / "nope") is None
    assert registry.content_hash(tmp_path / "nope" / "deeper.parquet") is None


def test_a_file_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    """One stage's output is the next stage's input: the second hash comes from the cache."""
    calls = []
    real = fm.io.sha256_file
    monkeypatch.setattr(fm.io, "sha256_file", lambda p: calls.append(p) or real(p))
    write(tmp_path / "big" / "shard.bin", b"x" * 1000)
    first = registry.content_hash(tmp_path / "big")
    assert registry.content_hash(tmp_path / "big") == first
    assert registry.content_hash(tmp_path / "big" / "shard.bin") == sha(b"x" * 1000)
    assert len(calls) == 1
    write(tmp_path / "big" / "shard.bin", b"y" * 1001)  # a new size is a new key
    assert registry.content_hash(tmp_path / "big") == dir_hash({"shard.bin": b"y" * 1001})
    assert len(calls) == 2


# ---------------------------------------------------------------- stage_runs

def fake_curate(paths: Paths) -> dict[str, bytes]:
    """Small files where curate's dep (03_validated) and outs (04_curated, quarantine.parquet) live."""
    files = {"03_validated/text.parquet": b"validated text", "03_validated/code.parquet": b"validated code",
             "04_curated/text.parquet": b"curated text", "04_curated/stats.csv": b"n\n1\n",
             "quarantine.parquet": b"quarantined"}
    for rel, data in files.items():
        write(paths.workdir / rel, data)
    return files


def test_log_run_of_a_ran_stage_stores_params_inputs_and_outputs(paths):
    fake_curate(paths)
    params = Params()
    registry.log_run(paths, "curate", "ran", time.time() - 2.0, True, "", ["curate.seed=3"], {"kept": 2},
                     "20250101-000000-aaaa", params=registry.stage_params(params, "curate"))
    row = fetch(paths, "select status, recorded_in_dvc, run_id, params, inputs, outputs, seconds from stage_runs")
    assert len(row) == 1
    status, recorded, run_id, params_json, inputs, outputs, seconds = row[0]
    assert (status, recorded, run_id) == ("ran", True, "20250101-000000-aaaa")
    assert json.loads(params_json) == {"curate": dataclasses.asdict(params.curate)}
    assert json.loads(params_json)["curate"]["jaccard_threshold"] == params.curate.jaccard_threshold
    assert json.loads(inputs) == {"03_validated": dir_hash({"code.parquet": b"validated code",
                                                            "text.parquet": b"validated text"})}
    assert json.loads(outputs) == {"04_curated": dir_hash({"text.parquet": b"curated text", "stats.csv": b"n\n1\n"}),
                                   "quarantine.parquet": sha(b"quarantined")}
    assert 2.0 <= seconds < 30


def test_log_run_hashes_only_what_ran(paths):
    """A missing out maps to null; failed and skipped rows keep their params but no hashes."""
    fake_curate(paths)
    (paths.workdir / "quarantine.parquet").unlink()
    registry.log_run(paths, "curate", "ran", time.time(), False, "", [], {}, "r1", params={"curate": {"seed": 1}})
    registry.log_run(paths, "curate", "failed", time.time(), False, "ValueError: x", [], {}, "r2",
                     params={"curate": {"seed": 2}})
    registry.log_run(paths, "curate", "skipped", time.time(), False, "up to date", [], {}, "r3")
    rows = fetch(paths, "select run_id, params, inputs, outputs from stage_runs order by run_id")
    assert json.loads(rows[0][3])["quarantine.parquet"] is None
    assert json.loads(rows[0][3])["04_curated"] is not None
    assert rows[1] == ("r2", json.dumps({"curate": {"seed": 2}}), None, None)
    assert rows[2] == ("r3", None, None, None)


def test_an_old_registry_gets_the_new_columns(paths):
    paths.workdir.mkdir(parents=True)
    con = duckdb.connect(str(paths.duckdb))
    con.execute("""create table stage_runs (stage varchar, status varchar, started double, seconds double,
                   recorded_in_dvc boolean, note varchar, overrides varchar, summary varchar, run_id varchar)""")
    con.execute("insert into stage_runs values ('ingest', 'ran', 1.0, 2.0, true, '', '[]', '{}', 'old')")
    con.close()
    fake_curate(paths)
    registry.log_run(paths, "curate", "ran", time.time(), False, "", [], {}, "new", params={"curate": {}})
    assert columns(paths, "stage_runs")[-3:] == ["params", "inputs", "outputs"]
    rows = fetch(paths, "select run_id, params, outputs is not null from stage_runs order by started")
    assert rows == [("old", None, False), ("new", json.dumps({"curate": {}}), True)]


# ---------------------------------------------------------------- shard_catalog

MANIFEST = {
    "format": 1,
    "tokenizer": {"path": "../tokenizer.json", "sha256": "ab" * 32, "vocab_size": 512},
    "dtype": "<u2",
    "shards": [
        {"path": "text-00000.bin", "kind": "tokens", "sha256": "11" * 32, "bytes": 2000, "tokens": 1000,
         "dtype": "<u2", "modality": "text", "documents": 7, "mix": {"modality": {"text": 7}},
         "token_mix": {"modality": {"text": 1000}, "lang": {"en": 600, "zh": 400}}},
        {"path": "docs-text-00000.arrow", "kind": "docs", "modality": "text", "sha256": "22" * 32, "bytes": 512,
         "tokens": 0, "documents": 7, "mix": {"source": {"a": 3, "b": 4}}},
    ],
}


def test_refresh_builds_the_shard_catalog_from_the_manifest(paths):
    manifest = paths.tokens / "shards" / "manifest.json"
    write(manifest, json.dumps(MANIFEST).encode())
    assert registry.refresh(paths, ["shard"]) == ["shard_catalog"]
    assert columns(paths, "shard_catalog") == [name for name, _ in registry.SHARD_CATALOG_SCHEMA]
    rows = fetch(paths, "select path, kind, modality, sha256, bytes, tokens, documents, mix, token_mix, "
                        "tokenizer_sha256, manifest_sha256 from shard_catalog order by path")
    manifest_sha = sha(manifest.read_bytes())
    assert rows == [
        ("docs-text-00000.arrow", "docs", "text", "22" * 32, 512, 0, 7, '{"source": {"a": 3, "b": 4}}', None,
         "ab" * 32, manifest_sha),
        ("text-00000.bin", "tokens", "text", "11" * 32, 2000, 1000, 7, '{"modality": {"text": 7}}',
         '{"lang": {"en": 600, "zh": 400}, "modality": {"text": 1000}}', "ab" * 32, manifest_sha),
    ]
    # a new manifest replaces the table, it does not add to it
    write(manifest, json.dumps({**MANIFEST, "shards": MANIFEST["shards"][:1]}).encode())
    registry.refresh(paths, ["shard"])
    assert fetch(paths, "select count(*), min(tokens) from shard_catalog") == [(1, 1000)]


@pytest.mark.parametrize("text", ['{"shards": [', '{"tokenizer": {}}', '[1, 2]',
                                  json.dumps({**MANIFEST, "shards": [{"path": "x.bin"}]})])
def test_a_broken_manifest_is_named(paths, text):
    manifest = paths.tokens / "shards" / "manifest.json"
    write(manifest, text.encode())
    with pytest.raises(ValueError, match=str(manifest)):
        registry.refresh(paths, ["shard"])


# ---------------------------------------------------------------- run_stages and fm runs --stages

def two_runs(paths: Paths) -> None:
    fake_curate(paths)
    t = time.time()
    registry.log_run(paths, "validate", "skipped", t - 100, False, "up to date", [], {}, "20250101-000000-aaaa")
    registry.log_run(paths, "curate", "ran", t - 99, True, "", [], {}, "20250101-000000-aaaa",
                     params={"curate": {"seed": 0}})
    registry.log_run(paths, "curate", "failed", t - 10, False, "OSError: disk full", [], {}, "20250102-000000-bbbb",
                     params={"curate": {"seed": 1}})


def test_run_stages_resolves_prefixes_and_latest(paths):
    two_runs(paths)
    first = registry.run_stages(paths, "20250101")
    assert [(r["run_id"], r["stage"], r["status"]) for r in first] == [
        ("20250101-000000-aaaa", "validate", "skipped"), ("20250101-000000-aaaa", "curate", "ran")]
    assert first[1]["outputs"]["quarantine.parquet"] == sha(b"quarantined")
    assert first[1]["params"] == {"curate": {"seed": 0}} and first[0]["outputs"] is None
    latest = registry.run_stages(paths, "latest")
    assert [(r["run_id"], r["stage"], r["status"], r["params"]) for r in latest] == [
        ("20250102-000000-bbbb", "curate", "failed", {"curate": {"seed": 1}})]
    assert registry.run_stages(paths, "latest~1") == first
    for bad in ("nope", "2025", "latest~2"):  # unknown, ambiguous, too far back
        with pytest.raises(ValueError):
            registry.run_stages(paths, bad)


def test_run_stages_without_a_registry(paths):
    with pytest.raises(ValueError, match="no run has been recorded"):
        registry.run_stages(paths, "latest")


def test_fm_runs_stages_prints_the_stage_rows(paths):
    two_runs(paths)
    runner = CliRunner()
    out = runner.invoke(app, ["runs", "--stages", "20250101", "--workdir", str(paths.workdir)])
    assert out.exit_code == 0, out.output
    assert "validate" in out.output and "curate" in out.output and "skipped" in out.output
    assert sha(b"quarantined")[:12] in out.output and sha(b"quarantined")[:13] not in out.output
    assert "20250101-000000-aaaa" in out.output
    latest = runner.invoke(app, ["runs", "--stages", "latest", "--workdir", str(paths.workdir)])
    assert latest.exit_code == 0 and "failed" in latest.output and "validate" not in latest.output
    bad = runner.invoke(app, ["runs", "--stages", "nope", "--workdir", str(paths.workdir)])
    assert bad.exit_code == 1 and "no run" in bad.output and "Traceback" not in bad.output
