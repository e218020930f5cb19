"""The fm pipeline as a Prefect flow: the stage table's DAG, each stage a task.

    fm run                       # all stages, ephemeral Prefect API (no server to start)
    fm run --from curate         # curate and everything downstream of it
    fm serve                     # deployments: the pipeline (optionally on a cron schedule) and one per stage
    python -m flows.pipeline     # the same flow without the fm CLI

Each stage waits only for its upstream stages, so independent branches run side by side (the
default task runner is a thread pool). A stage that dvc.lock records as current is skipped
unless `force`. The flow holds the work dir's lock for its whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from prefect import flow

from fm.dvcstate import RunContext
from fm.lock import workdir_lock
from fm.stages import STAGES, select_stages
from tasks.stages import STAGE_TASKS

# The stage names as a type: the deployment form in the Prefect UI offers them as a choice.
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]


@flow(name="fm-pipeline", log_prints=True)
def pipeline(
    raw: str = "data/01_raw",
    workdir: str = "data",
    params_file: str = "params.yaml",
    overrides: Optional[list[str]] = None,
    stages: Optional[list[StageName]] = None,
    from_stage: Optional[StageName] = None,
    force: bool = False,
) -> list[dict]:
    """Run the fm pipeline (or part of it) over the stage DAG.

    Args:
        raw: The raw corpus folder (text/, code/, image_text/, triples/).
        workdir: Where the layers 02_ingested .. 08_reports are written.
        params_file: The params file (one section per stage).
        overrides: Settings for this run only, as section.key=value (e.g. curate.jaccard_threshold=0.7). A stage whose sections they change reruns and is not recorded in dvc.lock.
        stages: Run only these stages (empty: all).
        from_stage: Run this stage and everything downstream of it.
        force: Rerun stages that dvc.lock records as up to date; training stages start from scratch.
    """
    selected = select_stages(stages, from_stage)
    # absolute paths: a stage's work never depends on the working directory (DVC calls may change it)
    raw, workdir, params_file = (str(Path(p).resolve()) for p in (raw, workdir, params_file))
    ctx = RunContext(raw, workdir, params_file, tuple(overrides or ()))
    ctx.params()  # a bad setting fails here, before any stage starts
    with workdir_lock(workdir, f"fm run (stages: {', '.join(selected)})"):
        futures = {}
        for name in selected:  # table order is a topological order
            upstream = [futures[u] for u in STAGES[name].upstream if u in futures]
            futures[name] = STAGE_TASKS[name].submit(ctx, force, wait_for=upstream)
        return [futures[name].result() for name in selected]


if __name__ == "__main__":
    pipeline()
