"""Nothing trusted blindly, nothing lost: damaged token shards and out-of-range token ids are one
error naming the file; a damaged or incomplete newest checkpoint is passed over for the newest
intact one (and the resumed losses equal an uninterrupted run's); tampered weights are refused;
another run's checkpoints stay resumable until this run has saved its own; and a killed
multi-process `fm pretrain` leaves no torchrun or worker behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fm.data.loader as loader_module
import fm.recipes.pretrain as recipe
import fm.train.checkpoint as ckpt
import fm.train.loop as loop
from fm import io as fm_io
from fm.config import PretrainConfig
from fm.data.loader import TokenLoader, verify_token_shards
from fm.data.shards import load_manifest
from fm.models import load_decoder, load_pretrained
from fm.paths import Paths
from fm.recipes.pretrain import pretrain, run
from fm.runner import check_inputs
from fm.train.checkpoint import checkpoint_problem, step_dirs
from fm.train.launch import LAUNCH_ID, launched_processes
from fm.train.optim import lr_at
from tests.conftest import REPO

TINY = dict(preset="tiny", model={"n_layer": 1, "d_model": 32, "n_head": 2}, seq_len=16, batch_size=4, max_steps=6,
            lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=1, ckpt_every=3, threads=1, peak_tflops=1.0,
            mix={"text": 1, "code": 1})


def cfg_of(**changes) -> PretrainConfig:
    return PretrainConfig(**{**TINY, **changes})


def workdir(tmp_path: Path, shards: Paths, name: str, copy_tokens: bool = False) -> Paths:
    """A fresh work dir reading the sample shards (a private copy of them when a test damages them)."""
    wd = tmp_path / name
    wd.mkdir()
    if copy_tokens:
        shutil.copytree(shards.tokens, wd / "05_tokens")
    else:
        (wd / "05_tokens").symlink_to(shards.tokens, target_is_directory=True)
    return Paths(shards.raw, wd)


def losses(paths: Paths) -> list[float]:
    return [json.loads(line)["loss"] for line in (paths.models / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def token_shard(paths: Paths, modality: str) -> Path:
    shard_dir = paths.tokens / "shards"
    entry = next(e for e in load_manifest(shard_dir)["shards"] if e["kind"] == "tokens" and e["modality"] == modality)
    return shard_dir / entry["path"]


# ------------------------------------------------------------------ token shards


def test_a_flipped_byte_in_a_token_shard_is_one_error_naming_it(sample_shards, tmp_path, monkeypatch):
    paths = workdir(tmp_path, sample_shards, "w", copy_tokens=True)
    shard = token_shard(paths, "text")
    flip_byte(shard)
    with pytest.raises(ValueError) as error:
        run(cfg_of(), paths, progress=False)
    message = str(error.value)
    assert message.startswith(f"{shard} does not match its sha256 in {shard.parent / 'manifest.json'}")
    assert "rerun `fm shard` (or `fm run --from shard`)" in message and "\n" not in message
    assert not (paths.checkpoints / "pretrain").exists()  # refused before anything was trained or written

    # With nproc > 1 the stage refuses it in its own process, before torchrun starts.
    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr(recipe, "launch_recipe", no_launch)
    with pytest.raises(ValueError, match=re.escape(f"{shard} does not match its sha256")):
        pretrain(cfg_of(nproc=2, batch_size=2), paths)

    # A truncated shard says so.
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=re.escape(f"{shard} has ") + r"\d+ bytes, .* says \d+: the shard is truncated"):
        run(cfg_of(), paths, progress=False)


def test_a_token_id_out_of_the_vocabulary_is_refused_naming_the_shard(sample_shards, tmp_path):
    """A shard whose checksum matches but whose ids do not fit the tokenizer (made with another one)."""
    paths = workdir(tmp_path, sample_shards, "w", copy_tokens=True)
    shard_dir = paths.tokens / "shards"
    manifest = load_manifest(shard_dir)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    shard = token_shard(paths, "code")
    tokens = np.fromfile(shard, dtype=manifest["dtype"])
    tokens[:] = vocab_size  # every window of this shard holds an id one past the vocabulary
    tokens.tofile(shard)
    entry = next(e for e in manifest["shards"] if e["path"] == shard.name)
    entry["sha256"] = ckpt.sha256_file(shard)  # the manifest agrees: only the ids are wrong
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ValueError, match=re.escape(f"{shard}: token id {vocab_size} at token 0 is outside the vocabulary")):
        verify_token_shards(shard_dir)
    with pytest.raises(ValueError, match=re.escape(f"{shard}: token id {vocab_size}")):
        run(cfg_of(), paths, progress=False)
    # The loader alone (no verification pass) refuses the window it reads, naming the file, not an IndexError.
    loader = TokenLoader(shard_dir, seq_len=16, batch_size=2, weights={"code": 1})
    with pytest.raises(ValueError, match=re.escape(f"{shard}: token id {vocab_size} at token ") + r"\d+ is outside"):
        loader.next_batch()


def test_the_tokenizer_is_checked_against_the_manifest(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w", copy_tokens=True)
    tokenizer = paths.tokens / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<|endoftext|>", "<|endoftexT|>", 1))
    with pytest.raises(ValueError, match=r"tokenizer.json does not match its sha256 in .*manifest.json.*rerun `fm shard`"):
        run(cfg_of(), paths, progress=False)


class CountHashes:
    """The sha256 passes of this process: the registry's (the stage door's) by path, and the loader's."""

    def __init__(self, monkeypatch):
        self.door: list[Path] = []
        self.loader = 0
        real_file, real_sha256 = fm_io.sha256_file, hashlib.sha256

        def sha256(*args):
            self.loader += 1
            return real_sha256(*args)

        monkeypatch.setattr(fm_io, "sha256_file", lambda path: self.door.append(Path(path)) or real_file(path))
        monkeypatch.setattr(loader_module, "hashlib", SimpleNamespace(sha256=sha256))


def token_shards(paths: Paths) -> list[Path]:
    shard_dir = paths.tokens / "shards"
    return [shard_dir / e["path"] for e in load_manifest(shard_dir)["shards"] if e["kind"] == "tokens"]


def settled(monkeypatch) -> None:
    """Copies made a moment ago, as good as old ones to known_hash: SETTLED_NS shortened to 50 ms (still longer
    than a clock tick, HZ=100's 10 ms), and 100 ms waited."""
    monkeypatch.setattr(fm_io, "SETTLED_NS", 5 * 10**7, raising=False)
    time.sleep(0.1)


def test_a_stage_hashes_each_token_shard_once(sample_shards, tmp_path, monkeypatch):
    """The door (check_inputs) hashes every shard; the loader's check then reuses those hashes for the files
    unchanged since, reading them only for their ids; and the other way round."""
    paths = workdir(tmp_path, sample_shards, "door-first", copy_tokens=True)
    other = workdir(tmp_path, sample_shards, "loader-first", copy_tokens=True)
    settled(monkeypatch)
    shards, counted = token_shards(paths), CountHashes(monkeypatch)
    check_inputs("pretrain", paths)
    assert [counted.door.count(s) for s in shards] == [1] * len(shards) and len(shards) > 1
    assert verify_token_shards(paths.tokens / "shards") == sum(s.stat().st_size for s in shards)
    assert counted.loader == 0

    shards = token_shards(other)
    verify_token_shards(other.tokens / "shards")
    assert counted.loader == len(shards)
    check_inputs("pretrain", other)
    assert not set(counted.door) & set(shards)


def test_a_shard_changed_just_before_its_hash_is_hashed_again(sample_shards, tmp_path, monkeypatch):
    """A file changed less than SETTLED_NS before the door hashed it could be changed again within the same clock
    tick without its times showing it ("racily clean"): the loader does not take the door's word for it."""
    paths = workdir(tmp_path, sample_shards, "w", copy_tokens=True)
    monkeypatch.setattr(fm_io, "SETTLED_NS", 10**12, raising=False)  # the copy is surely newer than that
    shards, counted = token_shards(paths), CountHashes(monkeypatch)
    check_inputs("pretrain", paths)
    verify_token_shards(paths.tokens / "shards")
    assert [counted.door.count(s) for s in shards] == [1] * len(shards) and counted.loader == len(shards)


@pytest.mark.parametrize("mtime", ["new", "restored"])
def test_a_shard_changed_after_the_door_is_refused_by_the_loader(sample_shards, tmp_path, monkeypatch, mtime):
    """The door passed the shard; then one byte of it changed (same size), with a new mtime or with the old one
    put back (cp -p, touch -r): the loader does not reuse the door's hash, and refuses it by name."""
    paths = workdir(tmp_path, sample_shards, "w", copy_tokens=True)
    settled(monkeypatch)
    check_inputs("pretrain", paths)
    shard = token_shard(paths, "text")
    before = shard.stat()
    tokens = np.fromfile(shard, dtype=load_manifest(shard.parent)["dtype"])
    tokens[len(tokens) // 2] ^= 1  # still an id of the vocabulary: only the sha256 can tell
    tokens.tofile(shard)
    if mtime == "new":
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    else:
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert after.st_size == before.st_size and (after.st_mtime_ns == before.st_mtime_ns) == (mtime == "restored")
    listed = shard.parent / "manifest.json"
    with pytest.raises(ValueError, match=re.escape(f"{shard} does not match its sha256 in {listed}")):
        verify_token_shards(shard.parent)


# ------------------------------------------------------------------ checkpoints


def damage(folder: Path, how: str) -> None:
    biggest = max((p for p in folder.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    if how == "flipped byte":
        flip_byte(biggest)
    elif how == "missing file":
        biggest.unlink()
    elif how == "missing checksums":
        (folder / "checksums.json").unlink()
    elif how == "truncated train_state":
        path = folder / "train_state.json"
        path.write_text(path.read_text()[:100])


@pytest.mark.parametrize("how", ["flipped byte", "missing file", "missing checksums", "truncated train_state"])
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_older_one(sample_shards, tmp_path, capsys, how):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(), paths, progress=False)  # checkpoints at steps 3 and 6
    straight = losses(paths)
    root = paths.checkpoints / "pretrain"
    assert [checkpoint_problem(p) for p in step_dirs(root)] == [None, None]
    damage(root / "step-00000006", how)
    capsys.readouterr()

    summary = run(cfg_of(), paths, progress=False)
    assert summary["resumed_from_step"] == 3
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "damaged or incomplete" in line]
    assert len(warned) == 1 and str(root / "step-00000006") in warned[0] and "kept as step-00000006.corrupt" in warned[0]
    assert "pretrain: resuming from step 3" in err
    assert losses(paths) == straight  # bit-identical to the uninterrupted run
    # the damaged folder is kept aside for inspection; the step-6 checkpoint was written again, intact
    assert (root / "step-00000006.corrupt").is_dir()
    assert [p.name for p in step_dirs(root)] == ["step-00000003", "step-00000006"]
    assert all(checkpoint_problem(p) is None for p in step_dirs(root))


def test_every_checkpoint_damaged_trains_from_zero_and_deletes_nothing(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(), paths, progress=False)
    straight = losses(paths)
    root = paths.checkpoints / "pretrain"
    for folder in step_dirs(root):
        damage(folder, "flipped byte")
    summary = run(cfg_of(), paths, progress=False)
    assert summary["resumed_from_step"] == 0 and losses(paths) == straight
    assert len([line for line in capsys.readouterr().err.splitlines() if "damaged or incomplete" in line]) == 2
    assert sorted(p.name for p in root.glob("step-*.corrupt")) == ["step-00000003.corrupt", "step-00000006.corrupt"]


def test_a_crash_while_saving_never_leaves_zero_intact_checkpoints(sample_shards, tmp_path, monkeypatch):
    """keep_checkpoints=1: the step-3 checkpoint is pruned only once step 6 is complete and hashed."""
    straight = workdir(tmp_path, sample_shards, "straight")
    run(cfg_of(keep_checkpoints=1), straight, progress=False)

    paths = workdir(tmp_path, sample_shards, "w")
    gather, calls = ckpt.all_gather_object, []

    def crash_on_second_save(obj):  # the step-6 files are written; the crash comes before they are published
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash while saving")
        return gather(obj)

    monkeypatch.setattr(ckpt, "all_gather_object", crash_on_second_save)
    with pytest.raises(OSError, match="simulated crash"):
        run(cfg_of(keep_checkpoints=1), paths, progress=False)
    monkeypatch.setattr(ckpt, "all_gather_object", gather)
    root = paths.checkpoints / "pretrain"
    assert [p.name for p in step_dirs(root)] == ["step-00000003"] and checkpoint_problem(root / "step-00000003") is None
    assert run(cfg_of(keep_checkpoints=1), paths, progress=False)["resumed_from_step"] == 3
    assert losses(paths) == losses(straight)
    assert [p.name for p in step_dirs(root)] == ["step-00000006"]


def test_a_checkpoint_from_before_checksums_resumes_with_a_note(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(), paths, progress=False)
    newest = paths.checkpoints / "pretrain" / "step-00000006"
    (newest / "checksums.json").unlink()
    state = json.loads((newest / "train_state.json").read_text())
    del state["checksums"]
    (newest / "train_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert run(cfg_of(), paths, progress=False)["resumed_from_step"] == 6
    assert "has no checksums.json (saved by an older fm): resuming it unverified" in capsys.readouterr().err


def test_a_run_failing_before_its_first_save_leaves_the_old_run_resumable(sample_shards, tmp_path, monkeypatch, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    root = paths.checkpoints / "pretrain"
    run(cfg_of(max_steps=3), paths, progress=False)
    old_losses = losses(paths)

    def crash_at_step_2(step, *args):
        if step == 1:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg_of(max_steps=3, seed=1), paths, progress=False)  # another run
    monkeypatch.setattr(loop, "lr_at", lr_at)
    assert [p.name for p in step_dirs(root)] == ["step-00000003"] and not list(paths.checkpoints.glob("pretrain.old-*"))
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 3  # the old run's log, untouched

    capsys.readouterr()
    summary = run(cfg_of(max_steps=3), paths, progress=False)  # the old configuration finds its own state
    assert summary["resumed_from_step"] == 3 and "already trained to step 3" in capsys.readouterr().err

    # The other run, run to the end, sets the old checkpoints and log aside at its first save.
    summary = run(cfg_of(max_steps=3, seed=1), paths, progress=False)
    (aside,) = paths.checkpoints.glob("pretrain.old-*")
    assert summary["set_aside"] == str(aside)
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step-00000003"]
    assert [json.loads(line)["loss"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == old_losses
    assert len(losses(paths)) == 3 and losses(paths) != old_losses
    assert json.loads((root / "step-00000003" / "train_state.json").read_text())["config"]["seed"] == 1


# ------------------------------------------------------------------ exported weights


def test_tampered_or_truncated_weights_are_refused_naming_the_file(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(max_steps=2, ckpt_every=2), paths, progress=False)
    folder = paths.models / "pretrain"
    weights = folder / "model.safetensors"
    recorded = json.loads((folder / "config.json").read_text())["weights"]
    assert recorded == {"path": "model.safetensors", "bytes": weights.stat().st_size, "sha256": ckpt.sha256_file(weights)}
    load_pretrained(folder)

    original = weights.read_bytes()
    flip_byte(weights, len(original) - 5)  # inside a tensor: safetensors itself would load it silently
    for load in (load_decoder, load_pretrained, ckpt.load_model):
        with pytest.raises(ValueError, match=re.escape(f"{weights} does not match its sha256 in config.json")):
            load(folder)
    weights.write_bytes(original[:-8])
    with pytest.raises(ValueError, match=re.escape(f"{weights} has {len(original) - 8} bytes, config.json says {len(original)}")):
        load_pretrained(folder)
    weights.write_bytes(original)
    load_pretrained(folder)


# ------------------------------------------------------------------ a killed multi-process pretrain


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ... (fields 3 on)


def descendants(pid: int) -> dict[int, str]:
    """pid's live descendants -> their start time (to tell them from a later process with the same pid)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        fields = _stat(p)
        if fields:
            found[p] = fields[19]  # starttime
            todo += children.get(p, [])
    return found


def alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.exists()}


KILL_SCRIPT = """
import signal, sys, threading
# A terminal's foreground job has SIGINT at its default. A process started by a job that ignores it (tests run
# in the background, `pytest &`, from a script) inherits SIG_IGN: then Ctrl-C never reached this process.
signal.signal(signal.SIGINT, signal.default_int_handler)
from fm.config import PretrainConfig
from fm.paths import Paths
from fm.recipes.pretrain import pretrain
args = (PretrainConfig(**{tiny}), Paths(sys.argv[1], sys.argv[2]))

def stage():
    pretrain(*args)
    print("the stage returned", flush=True)  # what fm would take as done

if sys.argv[3] == "main":
    stage()
else:  # as a Prefect task runs it (fm run): in a worker thread, where Python cannot handle signals
    failed = []
    def task():
        try:
            stage()
        except BaseException:
            failed.append(True)
            raise
    worker = threading.Thread(target=task)
    worker.start()
    worker.join()
    sys.exit(1 if failed else 0)  # a thread's exception alone leaves the exit status 0; fm run fails with its task
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kill, thread", [("SIGTERM", "main"), ("SIGKILL", "main"), ("Ctrl-C", "main"),
                                          ("Ctrl-C", "worker thread"), ("SIGTERM", "worker thread")])
def test_killing_a_multi_process_pretrain_leaves_nothing_running(sample_shards, tmp_path, kill, thread):
    """The stage started as `fm pretrain` would be, in a session of its own (a terminal's foreground group):
    Ctrl-C is SIGINT to that whole group, SIGTERM and SIGKILL go to the stage alone."""
    paths = workdir(tmp_path, sample_shards, "w")
    endless = {**TINY, "max_steps": 100_000, "ckpt_every": 5, "eval_every": 100_000, "nproc": 2, "batch_size": 2}
    script = KILL_SCRIPT.format(tiny=repr(endless))
    parent = subprocess.Popen([sys.executable, "-c", script, str(paths.raw), str(paths.workdir), thread], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    root, run_procs = paths.checkpoints / "pretrain", {}
    try:
        deadline = time.monotonic() + 180
        while not list(root.glob("step-*")):  # the workers are training and writing checkpoints
            assert parent.poll() is None, parent.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        run_procs = descendants(parent.pid)
        torchrun = [p for p in run_procs if _stat(p) and int(_stat(p)[1]) == parent.pid]
        assert len(torchrun) == 1 and len(run_procs) >= 3  # torchrun and its two workers
        launch_id = dict(line.split(b"=", 1) for line in Path(f"/proc/{torchrun[0]}/environ").read_bytes().split(b"\0")
                         if b"=" in line)[LAUNCH_ID.encode()].decode()
        assert len(launched_processes(launch_id)) == len(run_procs)

        if kill == "Ctrl-C":
            os.killpg(parent.pid, signal.SIGINT)
        else:
            os.kill(parent.pid, getattr(signal, kill))
        parent.wait(timeout=60)
        assert parent.returncode != 0 and "the stage returned" not in parent.stdout.read(), parent.stderr.read()[-3000:]
        deadline = time.monotonic() + 45
        while [p for p, start in run_procs.items() if alive(p, start)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p, start in run_procs.items() if alive(p, start)], "processes of the run survived"
        assert launched_processes(launch_id) == []
        before = snapshot(root)
        time.sleep(2)
        assert snapshot(root) == before  # nobody writes checkpoints or metrics any more
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for p, start in run_procs.items():  # never leave a failed test's processes running
            if alive(p, start):
                os.kill(p, signal.SIGKILL)
