"""The fm pipeline as a Prefect flow: the stage tasks in pipeline order.

    fm run                       # all stages, ephemeral Prefect API
    fm run --from curate         # rerun from one stage on
    python -m flows.pipeline     # the same flow without the fm CLI

`stages` / `from_stage` let a rerun (from the CLI or the Prefect UI) start anywhere; a stage
that dvc.lock records as up to date is skipped unless `force`.
"""

from __future__ import annotations

from prefect import flow

from fm.stages import select_stages
from tasks.stages import curate, ingest, pretrain, shard, tokenize, validate

PIPELINE = (ingest, validate, curate, tokenize, shard, pretrain)


@flow(name="fm-pipeline", log_prints=True)
def pipeline(
    raw: str = "data/01_raw",
    workdir: str = "data",
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> list[dict]:
    """Run the selected stages in order; each stage reads only what the one before it wrote."""
    selected = select_stages(stages, from_stage)
    summaries = []
    for stage_task in PIPELINE:
        if stage_task.name in selected:
            summaries.append(stage_task(raw, workdir, params_file, list(overrides or []), force))
    return summaries


if __name__ == "__main__":
    pipeline()
