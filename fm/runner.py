"""Run one stage the way every door runs it: skip when current, run, record, register.

`fm <stage>` (what dvc.yaml calls) and the Prefect tasks of `fm run` / `fm serve` both call
`execute_stage`, so they share one notion of "up to date" (fm/dvcstate.py) and leave the same
traces: dvc.lock, the registry's `stage_runs` row and its product tables (fm/registry.py).

A killed stage never leaves outputs that pass for done: before it starts, a marker
`<workdir>/.fm-running-<stage>` is written, and removed only when it succeeded. The next run
(`recover`, called under the work-dir lock by every door) removes the outputs of any stage whose
marker survived, so the stage reruns from scratch, and clears the `.tmp-*` leftovers of the killed
writes. The work-dir lock (fm/lock.py) is taken by the caller: once per flow run or CLI command.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from fm import registry
from fm.data.ingest import CorpusError
from fm.data.validate import ValidationGateError
from fm.dvcstate import RunContext, record_stage, stage_is_current
from fm.lock import WorkdirBusy
from fm.paths import Paths
from fm.stages import STAGES, resolve, run_stage

# What a user can cause and fix (bad input, settings, a missing layer, a full or read-only disk,
# a busy work dir): shown as one line naming the file and the problem; anything else is a bug
# and keeps its traceback. `fm --debug` shows the traceback of these too.
USER_ERRORS = (CorpusError, ValidationGateError, ValueError, OSError, WorkdirBusy)
TRAINING_LOCK = threading.Lock()  # one training stage at a time per process (see execute_stage)
TMP_NAME = re.compile(r"^\.tmp-([0-9a-f]{8}-|step-)")  # fm.io's temporaries and checkpoint folders in progress


def _marker(paths: Paths, name: str) -> Path:
    return paths.workdir / f".fm-running-{name}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(paths: Paths) -> list[str]:
    """Undo what killed runs left in the work dir (call it holding the work-dir lock). Returns what was done."""
    done = []
    if not paths.workdir.is_dir():
        return done
    for name, stage in STAGES.items():
        if _marker(paths, name).exists():
            for out in stage.outs + stage.metrics + tuple(stage.plots):
                _remove(resolve(out, paths))
            _marker(paths, name).unlink()
            done.append(f"stage {name} was interrupted: removed its partial outputs, it will run again")
    raw = paths.raw.resolve()
    stale = []
    for folder, dirs, files in os.walk(paths.workdir):
        if Path(folder).resolve() == raw:  # the user's corpus is never touched
            dirs[:] = []
            continue
        for entry in [d for d in dirs if TMP_NAME.match(d)] + [f for f in files if TMP_NAME.match(f)]:
            stale.append(Path(folder) / entry)
        dirs[:] = [d for d in dirs if not TMP_NAME.match(d)]
    for path in stale:
        _remove(path)
    if stale:
        done.append(f"removed {len(stale)} temporary file(s) of an interrupted write, e.g. {stale[0]}")
    for line in done:
        print(f"fm: {line}", file=sys.stderr)
    return done


def execute_stage(name: str, ctx: RunContext, force: bool = False, skip_current: bool = True) -> dict:
    """Run stage `name` unless DVC records it as current; record what ran. Returns its summary,
    with `status` ("ran" or "skipped") and a `note` when it was skipped or left unrecorded."""
    started = time.time()
    paths = ctx.paths
    if skip_current and not force and stage_is_current(ctx, name):
        summary = {"stage": name, "status": "skipped", "note": "up to date in dvc.lock (use --force to rerun)"}
        registry.log_run(paths, name, "skipped", started, False, summary["note"], list(ctx.overrides), summary,
                         ctx.run_id)
        return summary
    params = ctx.params()
    marker = _marker(paths, name)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()} {time.time()}\n")
    try:
        # Training stages run one at a time in a process: the flow runs independent stages in threads, and torch's
        # random state (dropout, initialisation) and thread pool are global to the process, so two concurrent
        # training runs would draw from each other's streams and neither would be reproducible.
        with (TRAINING_LOCK if STAGES[name].trains else nullcontext()):
            summary = run_stage(name, params, paths, fresh=force and STAGES[name].trains)
    except BaseException as e:
        registry.log_run(paths, name, "failed", started, False, f"{type(e).__name__}: {e}"[:500], list(ctx.overrides), {},
                         ctx.run_id, params=registry.stage_params(params, name))
        raise
    marker.unlink(missing_ok=True)
    summary["status"] = "ran"
    if os.environ.get("DVC_STAGE"):  # run by `dvc repro`, which records the stage itself
        recorded, why = False, "dvc repro records it"
    else:
        recorded, why = record_stage(ctx, name)
        if not recorded and why:
            summary["note"] = f"not recorded in dvc.lock: {why}"
    registry.refresh(paths, [name])
    # log_run also hashes the stage's deps and outs (the registry's inputs / outputs columns)
    registry.log_run(paths, name, "ran", started, recorded, summary.get("note", ""), list(ctx.overrides), summary,
                     ctx.run_id, params=registry.stage_params(params, name))
    return summary
