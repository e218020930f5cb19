"""SIGKILL at a seeded random point, then rerun: every training stage (pretrain on 1 and 2 processes, sft, distill,
pretrain_clip, caption) completes, ends bitwise equal to an uninterrupted run (weights and logged losses), leaves
no output that looks done while it is dead, no `.tmp-*` leftovers after the rerun and no process of the killed run.

Each run is `fm <stage> --raw R --workdir W --params P` in a process of its own (its own session, as a terminal
starts it), forked from a zygote that has imported fm once, so a run costs its work rather than a torch import.
A run to be killed carries a kill point (KILL_HOOK, loaded as sitecustomize by it and by torchrun's workers): there
it says so in a file and waits, and the test SIGKILLs the stage's process group, as `kill -9 -PGID` or a job
scheduler does; torchrun and its workers, in sessions of their own, must go down with it. The points:

    step:K    before training step K: steps 1..K-1 done, their metrics logged
    save:K    inside step K's checkpoint: its DCP files written to .tmp-step-K, not yet hashed or published
    export    the model folder complete in its .tmp- folder, not yet renamed into place
    rewrite   a rerun rewriting the metrics log back to its checkpoint's step, halfway through the write
    free      wherever the run is a seeded random delay after its first checkpoint appeared (mid-write included);
              a pause before the last step keeps the run from finishing first

The point (and the delay) is drawn from random.Random(FM_KILL_SEED and the test's name); assertion messages
print it. FM_KILL_SEED=N in the environment tries other points.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from fm.data.instructions import build_instructions
from fm.train.checkpoint import step_dirs
from tests._zygote import Zygote
from tests.test_clip_recipe import MODEL as CLIP_MODEL
from tests.test_clip_recipe import shards  # noqa: F401  (a fixture: sample shards with image-caption pairs)
from tests.test_trust import alive, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and reads /proc")

SEED = int(os.environ.get("FM_KILL_SEED", "15"))
MAX_STEPS, CKPT_EVERY = 6, 2  # checkpoints at steps 2, 4 and 6
LOOP = dict(max_steps=MAX_STEPS, warmup_steps=1, eval_every=3, eval_batches=1, ckpt_every=CKPT_EVERY,
            keep_checkpoints=2, log_every=1, threads=1)
# Dropout everywhere it exists, so that a resume that lost the RNG state would show.
PARAMS = {
    "pretrain": dict(preset="tiny", model={"n_layer": 2, "d_model": 32, "n_head": 2, "dropout": 0.1}, seq_len=128,
                     batch_size=2, lr=3e-3, peak_tflops=1.0, mix={"text": 1, "code": 1, "image_text": 1}, **LOOP),
    "pretrain_clip": dict(model=CLIP_MODEL, augment=2, batch_size=8, dtype="fp32", **LOOP),
    "caption": dict(n_prefix=2, max_caption_tokens=16, augment=2, retrieval_images=8, batch_size=4, **LOOP),
    "sft": dict(methods=["lora"], teacher="lora", lora={"rank": 4, "dropout": 0.1}, batch_size=2, mc_items=8, **LOOP),
    "distill": dict(student={"n_layer": 1, "dropout": 0.1}, text_share=0.5, batch_size=2, mc_items=4, **LOOP),
}
TWO_PROCESSES = ["--set", "pretrain.nproc=2", "--set", "pretrain.batch_size=1"]  # the same global batch

# Per stage: the model folder it writes (its metrics.jsonl and summary.json), its weight files, its checkpoint
# folder, and the upstream model folders its work dir takes from their reference runs.
MODEL_DIR = {"pretrain": "pretrain", "pretrain_clip": "clip", "caption": "caption", "sft": "sft/models/lora",
             "distill": "student"}
WEIGHTS = {"caption": ("model.safetensors", "prefix.safetensors")}
CHECKPOINTS = {"sft": "sft-lora"}
UPSTREAM = {"caption": ("pretrain", "pretrain_clip"), "sft": ("pretrain",), "distill": ("pretrain", "sft")}
TIMING = ("tokens_per_s", "step_s", "mfu")

KILL_HOOK = '''
"""tests/test_kill_training.py's kill point, loaded as sitecustomize by every process of a run to be killed:
at FM_KILL_AT the process writes FM_KILL_READY/<pid> and waits there to be killed."""
import os


def _install(point):
    import sys
    import time
    from contextlib import contextmanager
    from pathlib import Path

    import fm.io
    import fm.train.optim

    phase, _, arg = point.partition(":")
    n = int(arg or 0)
    step_s = float(os.environ.get("FM_KILL_STEP_S", "0"))

    def wait_to_be_killed():
        Path(os.environ["FM_KILL_READY"], str(os.getpid())).write_text(point)
        while True:
            time.sleep(60)

    def rebind(real, fake):
        """Replace `real` in its module and in every fm module that imported it by name (from fm.io import ...)."""
        for module_name, module in list(sys.modules.items()):
            if module_name == "fm" or module_name.startswith("fm."):
                for name in [k for k, v in vars(module).items() if v is real]:
                    setattr(module, name, fake)

    real_lr_at, real_sha256_file, real_atomic_dir = fm.train.optim.lr_at, fm.io.sha256_file, fm.io.atomic_dir

    def lr_at(step, *args):  # the first thing the loop does in a step (0-based)
        time.sleep(step_s)
        if phase in ("step", "free") and step + 1 == n:
            wait_to_be_killed()
        return real_lr_at(step, *args)

    def sha256_file(path):  # save_checkpoint hashes the files it wrote into .tmp-step-K before it publishes them
        if phase == "save" and Path(path).parent.name == f".tmp-step-{n:08d}":
            wait_to_be_killed()
        return real_sha256_file(path)

    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):  # a metrics log rewritten on resume: killed halfway through
        if phase == "rewrite" and self.name.endswith("metrics.jsonl"):
            with open(self, "w") as f:
                f.write(data[: len(data) // 2])
            wait_to_be_killed()
        return real_write_text(self, data, *args, **kwargs)

    @contextmanager
    def atomic_dir(path):
        with real_atomic_dir(path) as tmp:
            yield tmp
            if phase == "export" and "06_models" in Path(path).parts:  # complete, not yet renamed into place
                wait_to_be_killed()

    rebind(real_lr_at, lr_at)
    rebind(real_sha256_file, sha256_file)
    rebind(real_atomic_dir, atomic_dir)
    Path.write_text = write_text


if os.environ.get("FM_KILL_AT"):
    _install(os.environ["FM_KILL_AT"])
'''

# its first use imports torch._dynamo: once, in the zygote
PRELOAD = "import torch\ntorch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], foreach=True)"


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), PRELOAD, "sitecustomize", KILL_HOOK, hook_env="FM_KILL_AT")
    yield z
    z.close()


class Project:
    """The shared inputs (token shards with image-caption pairs, the instruction set, params.yaml) and the
    uninterrupted reference run of each stage, made on first use."""

    def __init__(self, sample, root: Path, zygote: Zygote):
        self.shards, self.root, self.zygote = sample, root, zygote
        self.params = root / "params.yaml"  # outside any DVC project: nothing is recorded in a dvc.lock
        self.params.write_text(yaml.safe_dump(PARAMS))
        self.instructions = root / "05_instructions"
        build_instructions(sample.curated, self.instructions)
        self._references: dict[tuple[str, bool], Path] = {}

    def workdir(self, stage: str, name: str) -> Path:
        """A fresh work dir reading the shared shards and instructions and the upstream stages' reference models."""
        wd = self.root / name
        (wd / "06_models").mkdir(parents=True)
        (wd / "05_tokens").symlink_to(self.shards.tokens.resolve(), target_is_directory=True)
        (wd / "05_instructions").symlink_to(self.instructions, target_is_directory=True)
        for up in UPSTREAM.get(stage, ()):
            top = MODEL_DIR[up].split("/")[0]
            (wd / "06_models" / top).symlink_to(self.reference(up) / "06_models" / top, target_is_directory=True)
        return wd

    def argv(self, stage: str, wd: Path, two_processes: bool = False) -> list[str]:
        return [stage, "--raw", str(self.shards.raw), "--workdir", str(wd), "--params", str(self.params),
                *(TWO_PROCESSES if two_processes else [])]

    def run(self, stage: str, wd: Path, log: Path, two_processes: bool = False) -> None:
        """`fm stage` to its end (a hung run is killed after 10 minutes, a bound for a loaded machine only)."""
        pid = self.zygote.start(self.argv(stage, wd, two_processes), log)
        start, deadline = descendants(self.zygote.proc.pid)[pid], time.monotonic() + 600
        while alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid, start):
            for p, s in {pid: start, **descendants(pid)}.items():
                if alive(p, s):
                    os.kill(p, signal.SIGKILL)
        code = self.zygote.wait(pid)
        assert code == 0, f"fm {stage} exited with {code}:\n{log.read_text()[-4000:]}"

    def reference(self, stage: str, two_processes: bool = False) -> Path:
        """The work dir of an uninterrupted run of `stage` (made once)."""
        key = (stage, two_processes)
        if key not in self._references:
            name = f"reference-{stage}" + ("-2proc" if two_processes else "")
            wd = self.workdir(stage, name)
            self.run(stage, wd, self.root / f"{name}.log", two_processes)
            self._references[key] = wd
        return self._references[key]


@pytest.fixture(scope="module")
def project(shards, tmp_path_factory, zygote):  # noqa: F811
    return Project(shards, tmp_path_factory.mktemp("kill"), zygote)


# ------------------------------------------------------------------ helpers


def records(folder: Path) -> list[dict]:
    """metrics.jsonl without its timing fields: everything that must be bit-identical."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def leftovers(wd: Path) -> list[Path]:
    """`.tmp-*` files and folders under the work dir (symlinked inputs not followed)."""
    found = []
    for folder, dirs, files in os.walk(wd):
        found += [Path(folder) / n for n in dirs + files if n.startswith(".tmp-")]
    return found


def draw_point(rng: random.Random, phases: tuple[str, ...]) -> str:
    """A kill point after the first checkpoint is published (see the module docstring)."""
    phase = rng.choice(phases)
    if phase == "step":
        return f"step:{rng.randint(CKPT_EVERY + 1, MAX_STEPS)}"
    if phase == "save":
        return f"save:{rng.choice(range(2 * CKPT_EVERY, MAX_STEPS + 1, CKPT_EVERY))}"
    if phase == "free":
        return f"free:{MAX_STEPS}"
    return phase


def expected_resume(point: str) -> set[int]:
    """The steps the rerun may resume from, given where the run was killed."""
    phase, _, arg = point.partition(":")
    if phase == "export":
        return {MAX_STEPS}  # trained to the end: only exported again
    if phase == "save":
        return {int(arg) - CKPT_EVERY}  # the half-written checkpoint is never taken
    if phase == "step":
        return {(int(arg) - 1) // CKPT_EVERY * CKPT_EVERY}
    return set(range(CKPT_EVERY, MAX_STEPS, CKPT_EVERY))  # free: any checkpoint before the last step


def kill_run(pid: int, start: str) -> dict[int, str]:
    """SIGKILL the stage's process group, as `kill -9 -PGID` or a job scheduler does; return every process the run
    had (torchrun and its workers, in sessions of their own, must go down with the stage: fm.train.launch)."""
    procs = {pid: start, **descendants(pid)}
    os.killpg(pid, signal.SIGKILL)
    return procs


def run_and_kill(project: Project, stage: str, wd: Path, point: str, rng: random.Random, name: str,
                 two_processes: bool) -> str:
    """Start `fm stage` with a kill point, SIGKILL it there, wait until every process of it is gone; returns where it
    was killed (for messages)."""
    ckpts = wd / "06_models" / "checkpoints" / CHECKPOINTS.get(stage, stage)
    ready, log = project.root / f"{name}.ready", project.root / f"{name}.log"
    ready.mkdir()
    env = {"FM_KILL_AT": point, "FM_KILL_READY": str(ready),
           "PYTHONPATH": os.pathsep.join([str(project.zygote.hook_dir), os.environ.get("PYTHONPATH", "")])}
    delay = None
    if point.startswith("free"):
        env["FM_KILL_STEP_S"] = "0.1"  # slow steps, so that the delay below lands anywhere among them
        delay = rng.uniform(0.0, 0.1 * (MAX_STEPS - CKPT_EVERY))
    where = f"seed {SEED}, kill point {point}" + (f" + {delay:.3f} s" if delay is not None else "")

    pid = project.zygote.start(project.argv(stage, wd, two_processes), log, env)
    start = descendants(project.zygote.proc.pid)[pid]
    procs = {pid: start}
    try:
        deadline = time.monotonic() + 300  # a generous bound for a loaded machine, not a timing assertion
        while not list(ready.iterdir()):
            if delay is not None and (ckpts / f"step-{CKPT_EVERY:08d}").is_dir():
                time.sleep(delay)
                break
            assert alive(pid, start), f"{where}: fm {stage} ended before its kill point:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{where}: fm {stage} did not reach its kill point in 300 s"
            time.sleep(0.05)
        procs = kill_run(pid, start)
        code = project.zygote.wait(pid)
        assert code == -signal.SIGKILL, f"{where}: fm {stage} exited with {code}:\n{log.read_text()[-4000:]}"
        deadline = time.monotonic() + 60
        while [p for p, s in procs.items() if alive(p, s)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p, s in procs.items() if alive(p, s)], f"{where}: processes of the killed run survived"
    finally:
        if alive(pid, start):  # a failure before the kill
            procs.update(descendants(pid))
        for p, s in procs.items():  # never leave a failed test's processes running
            if alive(p, s):
                os.kill(p, signal.SIGKILL)
    if two_processes:
        assert len(procs) >= 3, f"{where}: expected the stage, torchrun and its workers, got {len(procs)} processes"
    return where


def kill_and_resume(project: Project, stage: str, points: tuple[str, ...], rng: random.Random, name: str,
                    two_processes: bool = False) -> None:
    """Start `fm stage` and SIGKILL it at points[0] (then each rerun at the next point), checking what each killed run
    left; rerun it to the end and compare with the uninterrupted reference run."""
    wd = project.workdir(stage, name)
    out = wd / "06_models" / MODEL_DIR[stage]
    ckpts = wd / "06_models" / "checkpoints" / CHECKPOINTS.get(stage, stage)
    where = []
    for i, point in enumerate(points):
        where.append(run_and_kill(project, stage, wd, point, rng, f"{name}.{i}", two_processes))
        # Dead, it leaves nothing that passes for done: no model in place, its marker for the next run's recover().
        assert not out.exists() and (wd / f".fm-running-{stage}").is_file(), where
        if point.startswith("save"):  # the half-written checkpoint is there, under a name no resume takes
            assert (ckpts / f".tmp-step-{int(point.split(':')[1]):08d}").is_dir(), where
        if point == "export":  # the complete model is there, under a name nothing reads
            assert [p for p in out.parent.glob(f".tmp-*-{out.name}") if (p / "model.safetensors").is_file()], where
    published = [int(p.name.split("-")[1]) for p in step_dirs(ckpts)]

    log = project.root / f"{name}.rerun.log"
    project.run(stage, wd, log, two_processes)
    rerun = log.read_text()
    resumed = json.loads((out / "summary.json").read_text())["resumed_from_step"]
    assert resumed in expected_resume(points[0]) and resumed == max(published), f"{where}: {resumed}\n{rerun}"
    assert f"stage {stage} was interrupted" in rerun, f"{where}\n{rerun}"
    reference = project.reference(stage, two_processes) / "06_models" / MODEL_DIR[stage]
    assert records(out) == records(reference), where  # losses, lr, grad norms, val losses: bit for bit
    assert [r["step"] for r in records(out)] == list(range(1, MAX_STEPS + 1)), where
    for weights in WEIGHTS.get(stage, ("model.safetensors",)):
        assert (out / weights).read_bytes() == (reference / weights).read_bytes(), f"{where}: {weights} differs"
    assert leftovers(wd) == [], where
    assert not (wd / f".fm-running-{stage}").exists(), where


def rng_for(test: str) -> random.Random:
    return random.Random(f"{SEED}:{test}")


# ------------------------------------------------------------------ the tests

PHASES = ("step", "save", "export", "free")


@pytest.mark.parametrize("phase", PHASES)
def test_a_killed_pretrain_resumes_to_the_uninterrupted_runs_bits(project, phase):
    rng = rng_for(f"pretrain-{phase}")
    kill_and_resume(project, "pretrain", (draw_point(rng, (phase,)),), rng, f"pretrain-{phase}")


def test_a_rerun_killed_while_it_rewrites_the_metrics_log_loses_no_step(project):
    """Killed after an odd step (its log runs past the newest checkpoint), then killed again while the rerun cuts the
    log back to the checkpoint's step: the log is replaced whole or not at all, and the third run ends as the
    uninterrupted one did, every step logged once."""
    rng = rng_for("pretrain-rewrite")
    first = f"step:{rng.choice(range(CKPT_EVERY + 2, MAX_STEPS + 1, CKPT_EVERY))}"  # after step 3 or 5
    kill_and_resume(project, "pretrain", (first, "rewrite"), rng, "pretrain-rewrite")


# The other runs take the phases in turn (from the seed on), so that every phase is tried on more than one stage.
OTHERS = ("pretrain-2proc", "sft", "distill", "pretrain_clip", "caption")


def phase_of(run: str) -> str:
    return PHASES[(SEED + OTHERS.index(run)) % len(PHASES)]


@pytest.mark.slow  # three torchrun launches: about a minute
def test_a_killed_two_process_pretrain_resumes_to_the_uninterrupted_runs_bits(project):
    """The stage's process group is killed; torchrun and both workers go down with it."""
    rng = rng_for("pretrain-2proc")
    kill_and_resume(project, "pretrain", (draw_point(rng, (phase_of("pretrain-2proc"),)),), rng, "pretrain-2proc",
                    two_processes=True)


@pytest.mark.parametrize("stage", ["sft", "distill", "pretrain_clip", "caption"])
def test_a_killed_training_stage_resumes_to_the_uninterrupted_runs_bits(project, stage):
    rng = rng_for(stage)
    kill_and_resume(project, stage, (draw_point(rng, (phase_of(stage),)),), rng, stage)
