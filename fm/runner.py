"""Run one stage the way every door runs it: skip when current, run, record, register.

`fm <stage>` (what dvc.yaml calls) and the Prefect tasks of `fm run` / `fm serve` both call
`execute_stage`, so they share one notion of "up to date" (fm/dvcstate.py) and leave the same
traces: dvc.lock, the registry's `stage_runs` row and its product tables (fm/registry.py).
The work-dir lock (fm/lock.py) is taken by the caller: once per flow run or CLI command.
"""

from __future__ import annotations

import os
import time

from fm import registry
from fm.dvcstate import RunContext, record_stage, stage_is_current
from fm.stages import STAGES, run_stage


def execute_stage(name: str, ctx: RunContext, force: bool = False, skip_current: bool = True) -> dict:
    """Run stage `name` unless DVC records it as current; record what ran. Returns its summary,
    with `status` ("ran" or "skipped") and a `note` when it was skipped or left unrecorded."""
    started = time.time()
    paths = ctx.paths
    if skip_current and not force and stage_is_current(ctx, name):
        summary = {"stage": name, "status": "skipped", "note": "up to date in dvc.lock (use --force to rerun)"}
        registry.log_run(paths, name, "skipped", started, False, summary["note"], list(ctx.overrides), summary)
        return summary
    try:
        summary = run_stage(name, ctx.params(), paths, fresh=force and STAGES[name].trains)
    except BaseException as e:
        registry.log_run(paths, name, "failed", started, False, f"{type(e).__name__}: {e}"[:500], list(ctx.overrides), {})
        raise
    summary["status"] = "ran"
    if os.environ.get("DVC_STAGE"):  # run by `dvc repro`, which records the stage itself
        recorded, why = False, "dvc repro records it"
    else:
        recorded, why = record_stage(ctx, name)
        if not recorded:
            summary["note"] = f"not recorded in dvc.lock: {why}"
    registry.refresh(paths, [name])
    registry.log_run(paths, name, "ran", started, recorded, summary.get("note", ""), list(ctx.overrides), summary)
    return summary
