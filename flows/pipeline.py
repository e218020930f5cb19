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

from contextlib import ExitStack
from pathlib import Path
from typing import Literal, Optional

from prefect import flow
from prefect.states import Failed

from fm.dvcstate import RunContext
from fm.lock import WorkdirBusy, workdir_lock
from fm.runner import recover
from fm.stages import STAGES, select_stages
from tasks.stages import STAGE_TASKS

# The stage names as a type: the deployment form in the Prefect UI offers them as a choice.
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]


def _holder_name(selected: list[str]) -> str:
    """This run as the work dir's lock names it to a run it refuses: a served run also by its deployment and flow
    run, which is how to find it in the Prefect UI."""
    from prefect.runtime import deployment, flow_run

    name = f"fm run (stages: {', '.join(selected)})"
    if deployment.name:
        name += f" served as deployment fm-pipeline/{deployment.name}, flow run {flow_run.name}"
    return name


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
    with ExitStack() as held:
        try:
            ctx.params()  # a bad setting fails here, before any stage starts
            held.enter_context(workdir_lock(workdir, _holder_name(selected)))
        except (ValueError, WorkdirBusy) as e:  # one line for the user, not a traceback
            return Failed(message=str(e), data=e)
        recover(ctx.paths)  # what a killed run left behind
        futures = {}
        for name in selected:  # table order is a topological order
            upstream = [futures[u] for u in STAGES[name].upstream if u in futures]
            futures[name] = STAGE_TASKS[name].submit(ctx, force, wait_for=upstream)
        for future in futures.values():
            future.wait()
    failed = [futures[n].state for n in selected if futures[n].state.is_failed()]
    if failed:
        # The stage's error, as its own one-line message (the task logged it); no second traceback here.
        return Failed(message="; ".join(s.message for s in failed), data=failed[0].result(raise_on_failure=False))
    return [futures[name].result() for name in selected]


if __name__ == "__main__":
    pipeline()
