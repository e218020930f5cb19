"""Where a training run starts, and how it saves: shared by every training recipe (pretrain, sft, distill).

    session = TrainingSession("sft-lora", ckpt_root, identity, schedule, d, fresh=False)
    start_step = session.start(model, optimizer, loader, seed=cfg.seed, max_steps=cfg.max_steps)
    train(..., start_step=start_step, checkpoint_fn=lambda step: session.save(step, model, optimizer, loader, extra, keep),
          metrics_path=session.metrics_path)
    session.finish()

The newest intact checkpoint under `ckpt_root` is (plan_start)
    resumed      when it is this run (same run identity) with the same schedule: a crashed run goes on, and its
                 losses are bit-identical to an uninterrupted run's (every rank's RNG state is in the checkpoint;
                 on another process layout it is re-seeded, with a note); at max_steps nothing is trained again;
    continued    when it is this run with another schedule and it is before the new max_steps: the LR follows the
                 new schedule from that step on;
    set aside    otherwise (another run; a changed schedule at or past its max_steps; or `fresh`): training starts
                 at 0, and when it saves its first checkpoint the old ones move to `<root>.old-<run>-<time>/`,
                 never deleted. Until then they stay where they are: a run that fails before its first checkpoint
                 leaves the old run resumable by rerunning the old configuration.

A damaged or incomplete newest checkpoint is renamed step-XXXXXXXX.corrupt with a one-line warning and the next
older one is used. The run identity is whatever the recipe says a checkpoint must agree on to be resumed (model,
optimizer, seed, global batch, the exact data); the schedule, what may change between a run and its continuation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from torch import nn

from fm.io import atomic_path
from fm.train.checkpoint import (load_checkpoint, load_rng_state, newest_intact_checkpoint, save_checkpoint, seed_rng,
                                 set_aside)
from fm.train.parallel import Dist, broadcast_object

# A run that will set another run's checkpoints aside logs here until it has saved its first checkpoint.
PENDING_METRICS = ".metrics-pending.jsonl"


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def plan_start(saved: dict | None, identity: dict, schedule: dict, fresh: bool = False) -> tuple[str, str]:
    """What to do with the newest checkpoint, given its train_state.json (`saved`; None if there is none):
    ("start", ""), ("resume", ""), ("continue", what changed) or ("set_aside", why). See the module docstring."""
    if saved is None:
        return "start", ""
    if fresh:
        return "set_aside", "a fresh start was asked for"
    if saved.get("run_identity") != identity_hash(identity):
        old = saved.get("run") or {}
        differ = [k for k in identity if k in old and old[k] != identity[k]]
        return "set_aside", f"another run ({', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'})" if differ else "another run"
    old = saved["schedule"]
    if old == schedule:
        return "resume", ""
    changed = ", ".join(f"{k} {old.get(k)} -> {schedule[k]}" for k in schedule if old.get(k) != schedule[k])
    if saved["step"] < schedule["max_steps"]:
        return "continue", changed
    return "set_aside", f"the schedule changed ({changed}) and step {saved['step']} is not before max_steps {schedule['max_steps']}"


def metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a metrics log. The loop appends a line per step, so a run killed (or a disk
    that filled) mid-append leaves its last line cut short, without its newline: that line is dropped, as the step
    it logged comes after the newest checkpoint and is trained and logged again on resume. A line that does not
    parse anywhere else is damage, not a torn append: ValueError naming the file and line, never silently trimmed."""
    text = path.read_text(encoding="utf-8", errors="replace")  # records are ASCII: a bad byte fails its line below
    lines = text.split("\n")  # the last is "" when the log ends in its newline
    out = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if number == len(lines):
                continue  # the torn last append: no newline after it
            raise ValueError(f"{path}: line {number} is not a metrics record ({e}): the log is damaged, not cut "
                             f"short by a killed run; train from step 0 (--force), or move the log aside to resume "
                             f"without the records before the checkpoint") from None
        out.append((line, record))
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metric lines up to `step`: a resumed run rewrites what came after its checkpoint (and a torn last line,
    see metric_lines). The log is replaced whole (atomic_path): a run killed while rewriting it leaves the old log,
    not a cut one no resume can read."""
    if not path.exists():
        return
    keep = [line for line, record in metric_lines(path) if record["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


class TrainingSession:
    """One training run's checkpoints under `root`: where it starts (start), saving (save), the hand-over (finish).

    name: how messages name the run ("pretrain", "sft lora"). identity, schedule: see the module docstring; the
    schedule must hold max_steps. After start(): start_step, metrics_path (where the loop appends its records),
    schedule_history (the schedules this run trained under, with the step each took over) and summary_extra
    (what the run's summary should say about a continuation or a set-aside run).
    """

    def __init__(self, name: str, root: Path, identity: dict, schedule: dict, d: Dist, fresh: bool = False):
        self.name, self.root, self.identity, self.schedule, self.d, self.fresh = name, Path(root), identity, schedule, d, fresh
        self.start_step = 0
        self.metrics_path = self.root / "metrics.jsonl"
        self.schedule_history = [{"from_step": 0, **schedule}]
        self.summary_extra: dict = {}
        self._old_run: tuple[str, int] | None = None  # (tag, step) of checkpoints to set aside at the first save

    def _say(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr)

    def start(self, model: nn.Module, optimizer, loader, seed: int) -> int:
        """Find the newest intact checkpoint, decide (rank 0; every rank follows), load it; return the first step."""
        d, max_steps = self.d, self.schedule["max_steps"]
        action, why, newest, saved = "start", "", None, None
        if d.is_main:
            found, skipped = newest_intact_checkpoint(self.root)
            for path, problem, moved in skipped:
                self._say(f"checkpoint {path} is damaged or incomplete ({problem}): not resumed, kept as {moved.name}")
            newest, saved = found if found else (None, None)
            action, why = plan_start(saved, self.identity, self.schedule, self.fresh)
            if action in ("resume", "continue") and "checksums" not in saved:
                self._say(f"{newest} has no checksums.json (saved by an older fm): resuming it unverified")
        action, newest = broadcast_object((action, str(newest) if newest else None))
        if action in ("resume", "continue"):
            state = load_checkpoint(Path(newest), model, optimizer, verify=False)  # rank 0 has just checked it
            loader.load_state_dict(state["loader"])
            self.start_step = state["step"]
            if not load_rng_state(Path(newest), state, d):
                seed_rng(seed, d, self.start_step)
                if d.is_main:
                    self._say(f"{newest} holds no RNG state for this process layout: dropout re-seeded from seed, "
                              f"data-parallel rank and step {self.start_step} (the losses will not be bit-identical "
                              f"to an uninterrupted run's)")
            self.schedule_history = state["schedule_history"]
            if action == "continue":
                self.schedule_history = self.schedule_history + [{"from_step": self.start_step, **self.schedule}]
                self.summary_extra = {"continued_from_step": self.start_step,
                                      "previous_max_steps": state["schedule"]["max_steps"],
                                      "previous_schedule": {k: v for k, v in state["schedule"].items()
                                                            if self.schedule.get(k) != v}}
        # Another run's checkpoints move aside only once this run has saved one of its own: a run that fails
        # before that leaves them in place, resumable. Until then this run logs to PENDING_METRICS.
        if d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / PENDING_METRICS).unlink(missing_ok=True)  # from a run that failed before its first save
            if action == "set_aside":
                self._old_run = (saved.get("run_identity", "unknown")[:8], saved["step"])
                self.metrics_path = self.root / PENDING_METRICS
                self._say(f"{why}: training from step 0 (the checkpoints up to step {saved['step']} move aside "
                          f"when this run saves its first)")
            elif action == "continue":
                self._say(f"continuing the run from step {self.start_step} with a new schedule ({why})")
            elif action == "resume" and self.start_step >= max_steps:
                self._say(f"already trained to step {self.start_step} with this configuration; exporting it again "
                          f"(to train from step 0: --force)")
            elif action == "resume":
                self._say(f"resuming from step {self.start_step}")
            if action != "set_aside":
                truncate_metrics(self.metrics_path, self.start_step)
        return self.start_step

    def _set_old_run_aside(self, leave: tuple[str, ...] = ()) -> None:
        tag, old_step = self._old_run
        self._old_run = None
        if not self.d.is_main:
            return
        aside = set_aside(self.root, tag, leave=("launch.json", PENDING_METRICS, *leave))
        os.replace(self.root / PENDING_METRICS, self.root / "metrics.jsonl")  # the loop's open file follows the rename
        self._say(f"the other run's checkpoints up to step {old_step} set aside in {aside}")
        self.summary_extra["set_aside"] = str(aside)

    def save(self, step: int, model: nn.Module, optimizer, loader, extra: dict, keep: int) -> None:
        """A checkpoint at `step` (collective): model, optimizer, loader and RNG state, the identity and schedule,
        and `extra` (e.g. the config) in train_state.json. The first one of a new run sets the old run aside."""
        state = {"loader": loader.state_dict(), "run_identity": identity_hash(self.identity), "run": self.identity,
                 "schedule": self.schedule, "schedule_history": self.schedule_history, **extra}
        hand_over = self._old_run is not None
        save_checkpoint(self.root, step, model, optimizer, state, self.d, keep=keep,
                        before_publish=(lambda tmp: self._set_old_run_aside((tmp.name,))) if hand_over else None)
        self._old_run = None

    def finish(self) -> None:
        """After training: a run that trained without saving (it cannot, as the last step always saves; kept for
        safety) hands over now."""
        if self._old_run is not None:
            self._set_old_run_aside()

    def write_records(self, out_dir: Path) -> tuple[list[dict], dict]:
        """Copy the run's metrics.jsonl (every step from 1 to the last trained) into out_dir and write loss.csv
        beside it (rank 0). Returns (the records, {final_loss, val_loss}: the last of each)."""
        path = self.root / "metrics.jsonl"
        lines = metric_lines(path) if path.exists() else []
        (out_dir / "metrics.jsonl").write_text("".join(line + "\n" for line, _ in lines))
        records = [record for _, record in lines]
        (out_dir / "loss.csv").write_text("\n".join([LOSS_CSV_HEADER, *(loss_csv_row(r) for r in records)]) + "\n")
        figures = {"final_loss": round(records[-1]["loss"], 4)} if records else {}
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        if vals:
            figures["val_loss"] = round(vals[-1], 4)
        return records, figures


LOSS_CSV_HEADER = "step,loss,val_loss,lr"  # the loss curve for `dvc plots` and the registry


def loss_csv_row(record: dict, *extra: str) -> str:
    """One loss.csv line of a metrics record: val_loss is empty between evaluations; extra columns appended."""
    val = f"{record['val_loss']:.6f}" if "val_loss" in record else ""
    return ",".join([str(record["step"]), f"{record['loss']:.6f}", val, f"{record['lr']:.6g}", *extra])
