"""The data stages (ingest, validate, curate, tokenize, instructions, shard) killed or out of disk space.

SIGKILL at a seeded random point, then `fm <stage>` again: it completes with the uninterrupted run's bytes; the
killed run left nothing that passes for done (its marker, and under final names only whole files), none of its
processes (curate's MinHash workers included) and, after the rerun, no `.tmp-*` leftover. A full disk (a
file-size limit everywhere; a small tmpfs where mounting is permitted): one line naming the output, no
traceback, every other file of the work dir as it was, the stage's previous outputs whole, and a rerun with
room succeeds. tests/test_pipeline.py kills export and evaluate with the same hook (`run_killed`).

Each run is `fm <stage> --raw R --workdir W --params P` in a process of its own (its own session, as a
terminal starts it), forked from a zygote that has imported fm once, so a run costs its work rather
than a torch import. A run to be killed carries a hook (HOOK below) that counts the changes it makes
under its work dir (files opened for writing, renames, removals, new folders: Python's audit events),
and SIGKILLs its own process just before the K-th: between the writes of a file and its rename, between
the two renames of a layer's swap, before the marker's removal. K is drawn from random.Random(FM_KILL_SEED
and the stage) among the changes an uninterrupted run makes between writing its `.fm-running-<stage>`
marker and removing it; assertion messages print the seed and the change. FM_KILL_SEED=N tries others.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fm.stages import STAGES
from tests._zygote import Zygote
from tests.conftest import REPO, make_good_corpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and reads /proc")

SEED = int(os.environ.get("FM_KILL_SEED", "14"))
DATA_STAGES = ("ingest", "validate", "curate", "tokenize", "instructions", "shard")
SWAPPED_LAYER = ("ingest", "validate", "shard")  # a whole folder replaced by fm.io.atomic_dir's two renames

HOOK = r'''
"""tests/test_kill_stages.py's hook, installed in an `fm` run: one line in FM_HOOK_LOG per change the run makes
under FM_HOOK_ROOT; at the FM_KILL_AT-th change, or at the (FM_KILL_SKIP + 1)-th made FM_KILL_AFTER seconds or
more after the stage wrote its marker (the marker's removal at the latest), the process SIGKILLs itself, before
making the change."""
import os
import signal

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"open": 1, "os.rename": 2, "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "shutil.rmtree": 1}


def install():
    import sys
    import time

    root = os.path.realpath(os.environ["FM_HOOK_ROOT"]) + os.sep
    log = os.open(os.environ["FM_HOOK_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    kill_at = int(os.environ.get("FM_KILL_AT") or 0)
    kill_after = float(os.environ.get("FM_KILL_AFTER") or -1)  # or at a change this long after the marker
    kill_skip = int(os.environ.get("FM_KILL_SKIP") or 0)
    count, marked, late = 0, None, 0

    def under_root(path):
        if isinstance(path, int):
            return None
        path = os.path.abspath(os.fsdecode(path))
        return path[len(root):] if path.startswith(root) else None

    def hook(event, args):
        nonlocal count, marked, late
        if event not in CHANGES:
            return
        if event == "open":
            _, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS):
                return
        names = [under_root(p) for p in args[:CHANGES[event]]]
        if not any(n is not None for n in names):
            return
        count += 1
        line = f"{count} {event} {' -> '.join(str(n) for n in names)}"
        os.write(log, (line + "\n").encode())
        late += marked is not None and 0 <= kill_after <= time.monotonic() - marked
        unmarking = event == "os.remove" and (names[0] or "").startswith(".fm-running-")
        if marked is None and event == "open" and (names[0] or "").startswith(".fm-running-"):
            marked = time.monotonic()
        if count == kill_at or late > kill_skip or (kill_after >= 0 and unmarking):
            os.write(log, f"KILLED before {line}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    if os.environ.get("FM_KILL_POOL"):
        pool_kill(log, int(os.environ["FM_KILL_POOL"]))


def pool_kill(log, at):
    """curate's MinHash on 2 worker processes whatever the input's size; SIGKILL (this process only, as the OOM
    killer would) at the at-th Pool.map, its workers busy, their pids and the forkserver's logged first."""
    import multiprocessing.forkserver
    import multiprocessing.pool

    import fm.data.curate

    real_lsh_keys, real_map = fm.data.curate.lsh_keys, multiprocessing.pool.Pool.map
    calls = 0

    def lsh_keys(texts, cfg, total_chars, processes=None, **kwargs):
        return real_lsh_keys(texts, cfg, total_chars, processes or 2, **kwargs)

    def map_(self, func, iterable, chunksize=None):
        nonlocal calls
        calls += 1
        if calls == at:
            result = self.map_async(func, iterable, chunksize)  # the workers are at it
            pids = [p.pid for p in self._pool] + [multiprocessing.forkserver._forkserver._forkserver_pid]
            os.write(log, f"KILLED at Pool.map {calls}, processes {pids}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
            result.wait()
        return real_map(self, func, iterable, chunksize)

    fm.data.curate.lsh_keys = lsh_keys
    multiprocessing.pool.Pool.map = map_
'''

PRELOAD = """
import great_expectations  # what validate imports: a fork need not import it again
from fm.data.ingest import detect_lang
detect_lang("a sentence loads the language model")  # likewise ingest's fastText model
"""


def make_corpus(raw: Path) -> Path:
    """The four modalities: conftest's small corpus and slices of the bundled sample, so that every layer has
    a few files of some size (a few shards, tokenizer merges, instruction items) and the stages do real work."""
    make_good_corpus(raw)
    sample = REPO / "data" / "01_raw"
    for rel, lines in (("text/fortunes.jsonl", 300), ("text/tang-poems.jsonl", 60), ("code/cpython-lib.jsonl", 20),
                       ("triples/countries.jsonl", 400)):
        head = (sample / rel).read_text(encoding="utf-8").split("\n")[:lines]
        (raw / rel).write_text("\n".join(head) + "\n", encoding="utf-8")
    return raw


def make_params(path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["validate"]["min_pass_rate"] = 0.5
    params["tokenize"].update(vocab_size=400, min_frequency=2)
    params["shard"].update(tokens_per_shard=4000, docs_per_arrow_shard=40)
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return path


def run_killed(argv: list[str], wd: Path, folder: Path, kill_after: float, skip: int = 0) -> tuple[int, int, str]:
    """`fm argv` in a fresh interpreter (a session of its own) with the hook, SIGKILLed at its (skip + 1)-th change
    under `wd` made `kill_after` seconds or more after its marker was written (its marker's removal at the latest):
    (its pid, its exit code, the change it died before). What the zygote does cheaply for the data stages, for a
    stage whose uninterrupted run is already at hand."""
    (folder / "hook").mkdir(parents=True, exist_ok=True)
    (folder / "hook" / "kill_hook.py").write_text(HOOK)
    (folder / "tmp").mkdir()  # its TMPDIR, for the caller to check
    changes = folder / f"{argv[0]}.changes"
    env = dict(os.environ, FM_HOOK_LOG=str(changes), FM_HOOK_ROOT=str(wd), FM_KILL_AFTER=str(kill_after),
               FM_KILL_SKIP=str(skip), TMPDIR=str(folder / "tmp"),
               PYTHONPATH=os.pathsep.join([str(folder / "hook"), os.environ.get("PYTHONPATH", "")]))
    with open(folder / f"{argv[0]}.log", "w") as log:
        program = "import kill_hook; kill_hook.install(); from fm.cli import main; main()"
        proc = subprocess.Popen([sys.executable, "-c", program, *argv], cwd=folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait()
    last = changes.read_text().splitlines()[-1] if changes.exists() else "no change"
    return proc.pid, code, f"{last} ({(folder / f'{argv[0]}.log').read_text()[-2000:]})" if code != -9 else last


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), PRELOAD, "kill_hook", HOOK, hook_env="FM_HOOK_LOG")
    yield z
    z.close()


BOOKKEEPING = (".fm.lock", ".fm.lock.json", "fm.duckdb", "fm.duckdb.wal")  # the lock and the registry: every run's


class Layers:
    """The corpus, params.yaml and the uninterrupted run of each data stage in turn (made once): the work dir as
    it was before each stage, the changes each run made, and the reference work dir after them all. A stage that
    swaps a whole folder runs twice, the second run replacing the first's complete outputs."""

    def __init__(self, root: Path, zygote: Zygote):
        self.root, self.zygote = root, zygote
        self.raw = make_corpus(root / "raw")
        self.params = make_params(root / "params.yaml")  # outside any DVC project: nothing goes to a dvc.lock
        self.reference = root / "reference"
        self.before: dict[str, Path] = {}
        self.changes: dict[tuple[str, bool], list[str]] = {}
        for stage in DATA_STAGES:
            self.before[stage] = root / f"before-{stage}"
            if self.reference.exists():
                shutil.copytree(self.reference, self.before[stage], symlinks=True)
            else:
                self.before[stage].mkdir()
            for again in (False, True) if stage in SWAPPED_LAYER else (False,):
                name = f"reference-{stage}" + ("-again" if again else "")
                code = self.run(stage, self.reference, root / f"{name}.log", hook=root / f"{name}.changes")[1]
                assert code == 0, (root / f"{name}.log").read_text()[-3000:]
                self.changes[stage, again] = (root / f"{name}.changes").read_text().splitlines()

    def argv(self, stage: str, wd: Path) -> list[str]:
        return [stage, "--raw", str(self.raw), "--workdir", str(wd), "--params", str(self.params)]

    def run(self, stage: str, wd: Path, log: Path, hook: Path | None = None, kill_at: int = 0, kill_pool: int = 0,
            fsize: int = 0, tmpdir: Path | None = None) -> tuple[int, int]:
        env = {"FM_HOOK_LOG": str(hook), "FM_HOOK_ROOT": str(wd), "FM_KILL_AT": str(kill_at),
               "FM_KILL_POOL": str(kill_pool or "")} if hook else {}
        if tmpdir:
            env["TMPDIR"] = str(tmpdir)
        return self.zygote.run(self.argv(stage, wd), log, env, fsize)

    def kill_window(self, stage: str, again: bool = False) -> list[int]:
        """The changes (1-based) the stage makes after writing its marker, up to and including removing it (in
        its first run, or `again`, over its own complete outputs)."""
        marker = f".fm-running-{stage}"
        events = [line.split(" ", 2) for line in self.changes[stage, again]]
        start = next(int(n) for n, event, what in events if event == "open" and what == marker)
        end = next(int(n) for n, event, what in events if event == "os.remove" and what == marker)
        return list(range(start + 1, end + 1))

    def workdir(self, stage: str, name: str, after: bool = False) -> Path:
        """A copy of the work dir as it was before `stage` ran (or, `after`, when every data stage had run)."""
        wd = self.root / name
        shutil.copytree(self.reference if after else self.before[stage], wd, symlinks=True)
        return wd


@pytest.fixture(scope="module")
def layers(tmp_path_factory, zygote):
    return Layers(tmp_path_factory.mktemp("layers"), zygote)


def outputs(wd: Path, stage: str) -> dict[str, bytes]:
    """The files of the stage's outputs (under their final names) -> their bytes."""
    found = {}
    for rel in STAGES[stage].outs + STAGES[stage].metrics:
        path = wd / rel
        for f in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if f.is_file() and not f.name.startswith(".tmp-"):
                found[str(f.relative_to(wd))] = f.read_bytes()
    return found


def the_rest(wd: Path, stage: str) -> dict[str, bytes]:
    """Every other file in the work dir (the upstream and downstream layers), but the lock and the registry."""
    mine = set(outputs(wd, stage))
    return {str(f.relative_to(wd)): f.read_bytes() for f in sorted(wd.rglob("*"))
            if f.is_file() and str(f.relative_to(wd)) not in mine and f.name not in BOOKKEEPING
            and not f.name.startswith(".fm-running-")
            and not any(part.startswith(".tmp-") for part in f.relative_to(wd).parts)}


def leftovers(wd: Path) -> list[Path]:
    """The temporaries of fm.io (and checkpoint folders in progress) anywhere under the work dir."""
    return list(wd.rglob(".tmp-*"))


def session(sid: int) -> list[int]:
    """The live processes of session `sid` (a forked run is the leader of a session of its own)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "stat").read_text()
        except OSError:
            continue
        state, _, _, sess = text[text.rindex(")") + 2:].split()[:4]
        if int(sess) == sid and state != "Z":
            found.append(int(proc.name))
    return found


def gone(sid: int, within: float = 60.0) -> list[int]:
    """Wait (a generous bound for a loaded machine, not a timing assertion) for session `sid` to end; what is left."""
    deadline = time.monotonic() + within
    while (left := session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def reap(pids: list[int]) -> None:
    """Never leave a failed test's processes running."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ SIGKILL


def kill_and_rerun(layers: Layers, stage: str, k: int, again: bool = False) -> None:
    """Run `fm stage` (on its upstream outputs, or `again` over its own complete outputs too) until just before
    its k-th change and SIGKILL it; check what it left; rerun it; compare with the uninterrupted run."""
    window = layers.kill_window(stage, again)
    name = f"killed-{stage}-{k}" + ("-again" if again else "")
    wd = layers.workdir(stage, name, after=again)
    log, hook = layers.root / f"{name}.log", layers.root / f"{name}.changes"
    before = the_rest(wd, stage)
    pid, code = layers.run(stage, wd, log, hook=hook, kill_at=k)
    where = f"seed {SEED}: fm {stage}{' again' if again else ''} killed before change {k} of " \
            f"{window[0]}..{window[-1]}, {hook.read_text().splitlines()[-1] if hook.exists() else '?'}"
    left = gone(pid)
    reap(left)
    assert code == -9, f"{where}: exit {code}\n{log.read_text()[-3000:]}"
    assert left == [], f"{where}: processes of the killed run survived: {left}"

    # Dead, it leaves nothing that passes for done: its marker for the next run's recover(), and under their final
    # names only whole files (each either the reference's or absent: a file half-written in place would differ).
    assert (wd / f".fm-running-{stage}").is_file(), where
    reference = outputs(layers.reference, stage)
    assert [rel for rel, data in outputs(wd, stage).items() if data != reference.get(rel)] == [], where
    assert the_rest(wd, stage) == before, f"{where}: a file outside the stage's outputs changed"

    pid, code = layers.run(stage, wd, layers.root / f"{name}.rerun.log")
    rerun = (layers.root / f"{name}.rerun.log").read_text()
    assert code == 0, f"{where}: the rerun failed:\n{rerun[-3000:]}"
    assert f"stage {stage} was interrupted" in rerun, f"{where}\n{rerun[-3000:]}"
    assert outputs(wd, stage) == reference, f"{where}: the rerun's outputs differ from the uninterrupted run's"
    assert the_rest(wd, stage) == before, where
    assert leftovers(wd) == [], where
    assert not (wd / f".fm-running-{stage}").exists(), where


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_killed_data_stage_leaves_nothing_done_and_reruns_to_the_same_bytes(layers, stage):
    kill_and_rerun(layers, stage, random.Random(f"{SEED}:{stage}").choice(layers.kill_window(stage)))


@pytest.mark.parametrize("stage", SWAPPED_LAYER)
def test_a_data_stage_killed_while_replacing_its_outputs_reruns_to_the_same_bytes(layers, stage):
    """A rerun over the stage's complete outputs, killed anywhere: also between the renames of the layer swap."""
    window = layers.kill_window(stage, again=True)
    kill_and_rerun(layers, stage, random.Random(f"{SEED}:{stage}:again").choice(window), again=True)


# ------------------------------------------------------------------ a full disk

# Stages whose outputs are replaced in one rename when the new ones are complete (a folder swapped by
# fm.io.atomic_dir, or one file): a failed rerun leaves the previous outputs exactly as they were. curate and
# instructions replace their files one by one (each atomically), so a rerun that fails halfway leaves some
# files new and some old; their marker stays, and the next run removes them all (recover) and starts over.
SWAPPED_WHOLE = ("ingest", "validate", "tokenize", "shard")


def inodes(wd: Path, stage: str) -> dict[str, int]:
    return {rel: (wd / rel).stat().st_ino for rel in outputs(wd, stage)}


def fail_then_rerun_with_room(layers: Layers, stage: str, wd: Path, name: str, cause: str, fsize: int = 0,
                              make_room=lambda: None) -> None:
    """Run `fm stage` on a work dir that already holds every data stage's outputs, on a disk without room for the
    stage's new outputs; check the failure and what it left; make room, rerun, compare with the reference."""
    before, previous, previous_inodes = the_rest(wd, stage), outputs(wd, stage), inodes(wd, stage)
    log = layers.root / f"{name}.log"
    pid, code = layers.run(stage, wd, log, fsize=fsize)
    text = log.read_text()
    where = f"fm {stage} out of room ({cause})"
    assert code == 1, f"{where}: exit {code}\n{text[-3000:]}"
    assert "Traceback" not in text, f"{where}:\n{text[-3000:]}"
    errors = [line for line in text.splitlines() if line.startswith(f"error ({stage}):")]
    assert len(errors) == 1 and cause in errors[0], f"{where}:\n{text[-3000:]}"
    named = [out for out in STAGES[stage].outs if str(wd / out) in errors[0]]
    assert named, f"{where}: the error names none of the stage's outputs {STAGES[stage].outs}: {errors[0]}"
    assert the_rest(wd, stage) == before, f"{where}: a file outside the stage's outputs changed"
    # The previous outputs: every file under its final name is whole (an earlier run's, or the failed run's
    # complete one: the same bytes, from the same inputs), and the stage's marker says they are not to be trusted.
    assert outputs(wd, stage) == previous, f"{where}: a previous output was damaged or removed"
    if stage in SWAPPED_WHOLE:
        assert inodes(wd, stage) == previous_inodes, f"{where}: a previous output replaced before the new were complete"
    assert (wd / f".fm-running-{stage}").is_file(), where

    make_room()
    pid, code = layers.run(stage, wd, layers.root / f"{name}.rerun.log")
    rerun = (layers.root / f"{name}.rerun.log").read_text()
    assert code == 0, f"{where}: the rerun with room failed:\n{rerun[-3000:]}"
    assert outputs(wd, stage) == outputs(layers.reference, stage), where
    assert the_rest(wd, stage) == before, where
    assert leftovers(wd) == [] and not (wd / f".fm-running-{stage}").exists(), where


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_file_size_limit_fails_a_stage_in_one_line_and_a_rerun_with_room_succeeds(layers, stage):
    """RLIMIT_FSIZE stands in for a full disk anywhere (EFBIG instead of ENOSPC): set one byte under the stage's
    largest output file, every smaller file is written before the write that fails."""
    wd = layers.workdir(stage, f"fsize-{stage}", after=True)
    largest = max(len(data) for data in outputs(layers.reference, stage).values())
    fail_then_rerun_with_room(layers, stage, wd, f"fsize-{stage}", "File too large", fsize=largest - 1)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (mounting needs root, or CAP_SYS_ADMIN: skipped where not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command: the file-size limit test stands in")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the file-size limit test stands in")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_full_disk_fails_a_stage_in_one_line_and_a_rerun_with_room_succeeds(layers, small_disk, stage):
    """A real full disk (ENOSPC): the work dir on a small tmpfs, filled up but for a few pages (the lock's and
    the marker's), so that the stage's first output does not fit, nor the registry's record of the failure."""
    wd = small_disk / "work"
    shutil.copytree(layers.reference, wd, symlinks=True)
    filler = fill(small_disk, 3)
    fail_then_rerun_with_room(layers, stage, wd, f"disk-{stage}", "No space left on device", make_room=filler.unlink)


def fill(disk: Path, pages: int) -> Path:
    """Fill the disk but for `pages` pages (tmpfs counts whole pages per file); the filler file."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(bytes((stats.f_bavail - pages) * stats.f_frsize))
    return filler


def test_a_disk_that_fills_with_a_stages_outputs_leaves_it_done_with_a_note(layers, small_disk):
    """Room for shard's outputs (and the lock's and the marker's page) but not for the registry's record of
    the run: the stage is done, its outputs whole and its marker gone, and a line says the registry could not
    record it (the registry is derived: `fm registry` rebuilds its tables), with no traceback."""
    wd = small_disk / "work"
    shutil.copytree(layers.before["shard"], wd, symlinks=True)
    reference = outputs(layers.reference, "shard")
    page = os.statvfs(small_disk).f_frsize
    fill(small_disk, sum(-(-len(data) // page) for data in reference.values()) + 3)
    pid, code = layers.run("shard", wd, layers.root / "disk-after-shard.log")
    text = (layers.root / "disk-after-shard.log").read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert "shard ran, but the registry could not record it" in text, text[-3000:]
    assert outputs(wd, "shard") == reference
    assert leftovers(wd) == [] and not (wd / ".fm-running-shard").exists()


def test_a_killed_curate_leaves_none_of_its_worker_processes(layers):
    """curate's MinHash on 2 worker processes (what a corpus of 20 M characters or more gets), SIGKILL to curate
    alone (as the OOM killer sends it) while its workers are busy: the workers and the forkserver end by
    themselves, and the rerun gives the uninterrupted run's bytes (the same with 1 process). Python's
    multiprocessing leaves one thing behind, outside the work dir: its forkserver's socket (0 bytes) in a
    `pymp-*` folder of TMPDIR, which the killed process would have removed at exit."""
    at = random.Random(f"{SEED}:curate-pool").choice([1, 2])  # the MinHash of text, or of code
    wd = layers.workdir("curate", f"pool-{at}")
    log, hook, tmp = layers.root / f"pool-{at}.log", layers.root / f"pool-{at}.changes", layers.root / f"pool-{at}.tmp"
    tmp.mkdir()
    pid, code = layers.run("curate", wd, log, hook=hook, kill_pool=at, tmpdir=tmp)
    killed = hook.read_text().splitlines()[-1] if hook.exists() else ""
    where = f"seed {SEED}: fm curate {killed}"
    left = gone(pid)
    reap(left)
    assert code == -9 and killed.startswith("KILLED at Pool.map"), f"{where}: exit {code}\n{log.read_text()[-3000:]}"
    assert len(json.loads(killed.split("processes ")[1])) == 3, where  # two workers and the forkserver
    assert left == [], f"{where}: processes of the killed run survived: {left}"
    residue = [p for p in tmp.rglob("*") if not p.is_dir()]
    assert [p for p in residue if not (p.is_socket() and p.parent.name.startswith("pymp-"))] == [], where
    pid, code = layers.run("curate", wd, layers.root / f"pool-{at}.rerun.log")
    assert code == 0, (layers.root / f"pool-{at}.rerun.log").read_text()[-3000:]
    assert outputs(wd, "curate") == outputs(layers.reference, "curate"), where
    assert leftovers(wd) == [], where
