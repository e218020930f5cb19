"""Prefect tasks: one per stage, generated from the stage table (fm/stages.py).

Each task calls fm.runner.execute_stage (skip when DVC records the stage as current, else run
and record it), then makes the result visible in the Prefect UI: the counts table in the task's
log, a Markdown artifact per stage, and a final state named `Skipped` for a stage that did not
need to run (a plain Completed would look like work was done).

Retries only where another try can fix it: stages that read user files (`Stage.retries`), on
I/O errors other than a missing file. No Prefect result caching: dvc.lock is the one record of
what is current, and a second cache could disagree with it.
"""

from __future__ import annotations

import os

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed

from fm.dvcstate import RunContext
from fm.runner import USER_ERRORS, execute_stage
from fm.stages import STAGES, Stage
from fm.summary import as_markdown, as_text


def _io_error(task, task_run, state) -> bool:
    """Retry only what another try can fix: I/O errors, not bad input or a missing layer."""
    try:
        state.result()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    except BaseException:
        return False
    return False


def _make_task(stage: Stage) -> Task:
    def run_stage_task(ctx: RunContext, force: bool = False):
        try:
            summary = execute_stage(stage.name, ctx, force=force)
        except USER_ERRORS as e:
            if os.environ.get("FM_DEBUG"):
                raise
            # a user's error (bad input, settings, disk): one line in the UI and the log, no traceback
            return Failed(message=f"{stage.name}: {e}", data=e)
        get_run_logger().info("\n%s", as_text(summary))
        create_markdown_artifact(key=f"fm-{stage.name.replace('_', '-')}", markdown=as_markdown(summary),
                                 description=f"fm stage {stage.name}: counts and figures of its last run")
        if summary.get("status") == "skipped":
            return Completed(data=summary, name="Skipped", message=summary["note"])
        return summary

    run_stage_task.__name__ = run_stage_task.__qualname__ = f"run_{stage.name}"
    run_stage_task.__doc__ = stage.help
    return task(run_stage_task, name=stage.name, task_run_name=stage.name, retries=stage.retries,
                retry_delay_seconds=2, retry_condition_fn=_io_error if stage.retries else None,
                cache_policy=NO_CACHE)


STAGE_TASKS: dict[str, Task] = {name: _make_task(stage) for name, stage in STAGES.items()}
