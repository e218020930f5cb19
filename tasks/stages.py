"""Prefect tasks: one per stage, each reads its params section and calls one fm function.

The work is in fm/; these wrappers add what orchestration needs (names, retries on the
stage that reads user files, task-run names in the UI) and keep DVC in step: a stage DVC
records as up to date is skipped, and a stage that ran is recorded in dvc.lock, so `fm run`
and `dvc repro` share one notion of "stale".
"""

from __future__ import annotations

from prefect import task

from fm.config import load_params
from fm.dvcstate import matches_dvc_yaml, record_stage, stage_is_current
from fm.paths import Paths
from fm.stages import run_stage


def _run(name: str, raw: str, workdir: str, params_file: str, overrides: list[str], force: bool) -> dict:
    """Run one stage unless DVC already records it as up to date; then record it."""
    if not force and matches_dvc_yaml(raw, workdir, params_file, overrides) and stage_is_current(name):
        return {"stage": name, "skipped": "up to date in dvc.lock (use --force to rerun)"}
    summary = run_stage(name, load_params(params_file, overrides), Paths(raw, workdir))
    record_stage(name, raw=raw, workdir=workdir, params_file=params_file, overrides=overrides)
    return summary


def _io_error(task, task_run, state) -> bool:
    """Retry only what another try can fix: I/O errors, not bad input or a missing layer."""
    exc = state.data
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


# ingest reads user files, possibly on network storage: the one stage worth a retry.
@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=_io_error)
def ingest(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Read the raw corpus into Arrow tables."""
    return _run("ingest", raw, workdir, params_file, overrides, force)


@task(name="validate")
def validate(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Great Expectations gate over the ingested tables."""
    return _run("validate", raw, workdir, params_file, overrides, force)


@task(name="curate")
def curate(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Deduplicate and filter the validated tables."""
    return _run("curate", raw, workdir, params_file, overrides, force)


@task(name="tokenize")
def tokenize(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Train the BPE tokenizer."""
    return _run("tokenize", raw, workdir, params_file, overrides, force)


@task(name="shard")
def shard(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Write token and document shards."""
    return _run("shard", raw, workdir, params_file, overrides, force)


@task(name="pretrain")
def pretrain(raw: str, workdir: str, params_file: str, overrides: list[str], force: bool = False) -> dict:
    """Pretrain the decoder LM (resumes from its last checkpoint after a crash)."""
    return _run("pretrain", raw, workdir, params_file, overrides, force)
