"""Run one stage the way every door runs it: skip when current, run, record, register.

`fm <stage>` (what dvc.yaml calls) and the Prefect tasks of `fm run` / `fm serve` both call
`execute_stage`, so they share one notion of "up to date" (fm/dvcstate.py) and leave the same
traces: dvc.lock, the registry's `stage_runs` row and its product tables (fm/registry.py).

A stage never starts on inputs that cannot be what their stage wrote (`check_inputs`: unreadable Parquet
or JSON, a table without its columns, a shard that differs from manifest.json): it is refused, naming the
file and the stage to rerun, and its own last outputs stay in place.

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
from fm.dvcstate import RunContext, check_lock, record_stage, stage_is_current
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


def _producer(path: Path, paths: Paths) -> str:
    """The stage whose outputs hold `path` (for the "rerun `fm X`" of a message)."""
    for stage in STAGES.values():
        for out in stage.outs:
            where = resolve(out, paths)
            if path == where or where in path.parents:
                return stage.name
    return "the stage that wrote it"


def _schema_of(path: Path, paths: Paths):
    """The Arrow schema the stage that writes `path` gives it, for the layer tables that have one (else None)."""
    from fm.data.instructions import INSTRUCTION_SCHEMA, WITHHELD_SCHEMA
    from fm.data.schema import SCHEMAS

    if path.parent in (paths.ingested, paths.validated, paths.curated):
        return SCHEMAS.get(path.stem)
    if path.parent == paths.instructions:
        return {"train": INSTRUCTION_SCHEMA, "heldout": INSTRUCTION_SCHEMA, "withheld": WITHHELD_SCHEMA}.get(path.stem)
    return None


def check_inputs(name: str, paths: Paths) -> None:
    """Refuse to start stage `name` on an input that cannot be what its stage wrote, naming the file: a Parquet
    table whose footer does not read or that lacks a column of its schema, a JSON file that does not parse, a
    shard manifest that does not parse or lists a file that is missing or differs from its size and sha256.
    Found halfway through the stage, the same damage would be a pyarrow or KeyError without a path, or not
    found at all (a shard read unverified). The shards' hashes are the registry's, computed once per process."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for rel in STAGES[name].deps:
        dep = resolve(rel, paths)
        if rel == "raw" or not dep.exists():
            continue  # the stage says itself what is missing and which stage writes it
        files = [dep] if dep.is_file() else sorted(
            f for f in dep.rglob("*") if f.is_file() and not any(TMP_NAME.match(part) for part in f.relative_to(dep).parts))
        for file in files:
            rerun = f"rerun `fm {_producer(file, paths)}`"
            if file.suffix == ".parquet":
                try:
                    schema = pq.read_schema(file)  # the footer only
                except pa.ArrowException as e:
                    raise ValueError(f"{file} is not a readable Parquet table ({e}): it was cut short or overwritten; "
                                     f"{rerun}") from None
                expected = _schema_of(file, paths)
                wrong = [f"{f.name} ({f.type})" for f in expected or ()
                         if f.name not in schema.names or not schema.field(f.name).type.equals(f.type)]
                if wrong:
                    raise ValueError(f"{file} lacks the column(s) {', '.join(wrong)} that `fm {_producer(file, paths)}` "
                                     f"writes and this stage reads; {rerun}")
            elif file.suffix == ".json":
                try:
                    data = json.loads(file.read_bytes())
                    listed = [(e["path"], e["bytes"], e["sha256"]) for e in data["shards"]] + \
                        [(data["tokenizer"]["path"], None, data["tokenizer"]["sha256"])] if file.name == "manifest.json" else []
                except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    raise ValueError(f"{file} is not valid JSON or lacks a field ({type(e).__name__}: {e}): it was "
                                     f"cut short or overwritten; {rerun}") from None
                for shard, size, sha256 in listed:
                    shard = Path(os.path.normpath(file.parent / shard))  # the tokenizer's is ../tokenizer.json
                    if not shard.is_file():
                        raise FileNotFoundError(f"{shard} is missing (listed in {file}): {rerun}")
                    if size not in (None, shard.stat().st_size) or registry.content_hash(shard) != sha256:
                        raise ValueError(f"{shard} does not match its size and sha256 in {file}: it is damaged or "
                                         f"was changed since it was written; {rerun}")


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
    try:
        if (force or not skip_current) and not os.environ.get("DVC_STAGE"):  # dvc.lock not read yet (dvc repro read it):
            check_lock(ctx, name)  # refuse a damaged one before the work, not after it
        check_inputs(name, paths)  # before the marker: a stage refused here keeps its last outputs
        marker.write_text(f"{os.getpid()} {time.time()}\n")
        # Training stages run one at a time in a process: the flow runs independent stages in threads, and torch's
        # random state (dropout, initialisation) and thread pool are global to the process, so two concurrent
        # training runs would draw from each other's streams and neither would be reproducible.
        with (TRAINING_LOCK if STAGES[name].trains else nullcontext()):
            summary = run_stage(name, params, paths, fresh=force and STAGES[name].trains)
    except BaseException as e:
        try:
            registry.log_run(paths, name, "failed", started, False, f"{type(e).__name__}: {e}"[:500], list(ctx.overrides),
                             {}, ctx.run_id, params=registry.stage_params(params, name))
        except Exception as not_logged:  # e.g. the disk that failed the stage is full: its error is the one to show
            print(f"fm: the failed run of {name} is not in the registry ({str(not_logged).splitlines()[0]})",
                  file=sys.stderr)
        raise
    marker.unlink(missing_ok=True)
    summary["status"] = "ran"
    if os.environ.get("DVC_STAGE"):  # run by `dvc repro`, which records the stage itself
        recorded, why = False, "dvc repro records it"
    else:
        recorded, why = record_stage(ctx, name)
        if not recorded and why:
            summary["note"] = f"not recorded in dvc.lock: {why}"
    try:
        registry.refresh(paths, [name])
        # log_run also hashes the stage's deps and outs (the registry's inputs / outputs columns)
        registry.log_run(paths, name, "ran", started, recorded, summary.get("note", ""), list(ctx.overrides), summary,
                         ctx.run_id, params=registry.stage_params(params, name))
    except Exception as e:  # the outputs are complete: a registry that cannot be written (a full disk) is a note
        import duckdb

        if not isinstance(e, (OSError, duckdb.Error)):
            raise
        print(f"fm: {name} ran, but the registry could not record it ({str(e).splitlines()[0]}); `fm registry` "
              f"rebuilds its tables from the outputs", file=sys.stderr)
    return summary
