"""Prefect tasks: one per stage, each reads its params section and calls one fm function.

The work is in fm/; these wrappers add what orchestration needs (names, retries on the
stage that reads user files, task-run names in the UI) and record the stage for DVC, so
`dvc repro` afterwards sees it as up to date.
"""

from __future__ import annotations

from prefect import task

from fm.config import load_params
from fm.dvcstate import record_stage
from fm.paths import Paths
from fm.stages import run_stage


def _run(name: str, raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    summary = run_stage(name, load_params(params_file, overrides), Paths(raw, workdir))
    record_stage(name, raw=raw, workdir=workdir, params_file=params_file, overrides=overrides)
    return summary


@task(name="ingest", retries=2, retry_delay_seconds=2)  # reads user files, possibly on network storage
def ingest(raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    """Read the raw corpus into Arrow tables."""
    return _run("ingest", raw, workdir, params_file, overrides)


@task(name="validate")
def validate(raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    """Great Expectations gate over the ingested tables."""
    return _run("validate", raw, workdir, params_file, overrides)


@task(name="curate")
def curate(raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    """Deduplicate and filter the validated tables."""
    return _run("curate", raw, workdir, params_file, overrides)


@task(name="tokenize")
def tokenize(raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    """Train the BPE tokenizer."""
    return _run("tokenize", raw, workdir, params_file, overrides)


@task(name="shard")
def shard(raw: str, workdir: str, params_file: str, overrides: list[str]) -> dict:
    """Write token and document shards."""
    return _run("shard", raw, workdir, params_file, overrides)
