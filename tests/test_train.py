"""Pretraining: exact resume, 2-process gloo (DDP and FSDP2) against 1 process, resharded
resume on 1 process of a 2-process run, and the exported model reproducing its val loss."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import fm.train.loop as loop
from fm.config import PretrainConfig
from fm.data.loader import TokenLoader
from fm.paths import Paths
from fm.recipes.pretrain import pretrain, run
from fm.train.checkpoint import latest_checkpoint, load_model
from fm.train.loop import evaluate
from fm.train.optim import build_optimizer, lr_at
from fm.train.session import truncate_metrics

TINY = dict(preset="tiny", model={"n_layer": 2, "d_model": 64, "n_head": 4}, seq_len=32, max_steps=6, lr=3e-3,
            warmup_steps=2, eval_every=3, eval_batches=2, ckpt_every=3, threads=1, peak_tflops=1.0,
            mix={"text": 1, "code": 1})


def workdir(tmp_path: Path, shards: Paths, name: str) -> Paths:
    """A fresh work dir that reads the shared sample shards."""
    wd = tmp_path / name
    wd.mkdir()
    (wd / "05_tokens").symlink_to(shards.tokens, target_is_directory=True)
    return Paths(shards.raw, wd)


def losses(paths: Paths) -> list[float]:
    lines = (paths.models / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_interrupted_run_resumes_bit_identical(sample_shards, tmp_path, monkeypatch):
    cfg = PretrainConfig(**TINY, batch_size=4)
    straight = workdir(tmp_path, sample_shards, "straight")
    run(cfg, straight, progress=False)

    crashed = workdir(tmp_path, sample_shards, "crashed")

    def crash_at_step_5(step, *args):
        if step == 4:  # 0-based: the fifth step, after the checkpoint at step 3
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, crashed, progress=False)
    assert latest_checkpoint(crashed.checkpoints / "pretrain").name == "step-00000003"
    assert not (crashed.models / "pretrain").exists()  # a crashed run leaves no model that looks done
    monkeypatch.setattr(loop, "lr_at", lr_at)
    summary = run(cfg, crashed, progress=False)
    assert summary["resumed_from_step"] == 3
    assert losses(crashed) == losses(straight)  # bit-identical, not approximately equal
    assert len(losses(straight)) == 6 and losses(straight)[-1] < losses(straight)[0]


def test_a_torn_last_metrics_line_is_dropped_on_resume(sample_shards, tmp_path, monkeypatch):
    """Killed (or the disk filled) while appending step 4's record: the log ends in half a line, no newline. The
    resume from step 3 drops it and logs step 4 again: every step once, the losses of an uninterrupted run."""
    cfg = PretrainConfig(**TINY, batch_size=4)
    straight = workdir(tmp_path, sample_shards, "straight")
    run(cfg, straight, progress=False)
    torn = workdir(tmp_path, sample_shards, "torn")

    def crash_at_step_5(step, *args):
        if step == 4:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, torn, progress=False)
    log = torn.checkpoints / "pretrain" / "metrics.jsonl"
    text = log.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    assert json.loads(last)["step"] == 4
    log.write_text(text[: len(text) - len(last) // 2 - 1])  # step 4's line cut in half, as a killed append leaves it
    monkeypatch.setattr(loop, "lr_at", lr_at)
    summary = run(cfg, torn, progress=False)
    assert summary["resumed_from_step"] == 3
    steps = [json.loads(line)["step"] for line in (torn.models / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses(torn) == losses(straight)


def test_a_damaged_metrics_line_is_refused_by_file_and_line(sample_shards, tmp_path):
    """Only a torn last append is dropped: a bad line anywhere else (or a bad last line that has its newline) is
    damage, refused naming the file and the line, and the log is left as it was."""
    paths = workdir(tmp_path, sample_shards, "w")
    run(PretrainConfig(**TINY, batch_size=4), paths, progress=False)
    lines = (paths.models / "pretrain" / "metrics.jsonl").read_text().splitlines(keepends=True)  # what the loop wrote
    log = tmp_path / "metrics.jsonl"
    for damaged, number in ([*lines[:2], "garbage\n", *lines[3:]], 3), ([*lines[:-1], lines[-1][:20] + "\n"], 6):
        log.write_text("".join(damaged))
        with pytest.raises(ValueError, match=re.escape(f"{log}: line {number} is not a metrics record")):
            truncate_metrics(log, 3)
        assert log.read_text() == "".join(damaged)
    log.write_text("".join(lines[:-1]) + lines[-1][:20])  # torn: no newline
    truncate_metrics(log, 6)
    assert log.read_text() == "".join(lines[:-1])


def test_changed_config_does_not_resume(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w")
    run(PretrainConfig(**TINY, batch_size=4), paths, progress=False)  # checkpoints at steps 3 and 6
    # a schedule that ends before the newest checkpoint cannot continue it: a new run
    summary = run(PretrainConfig(**{**TINY, "max_steps": 3, "lr": 1e-3}, batch_size=4), paths, progress=False)
    assert summary["resumed_from_step"] == 0
    # the other run's checkpoints are set aside (not deleted), so this run's own (step 3) is the newest
    assert sorted(p.name for p in (paths.checkpoints / "pretrain").glob("step-*")) == ["step-00000003"]
    (aside,) = paths.checkpoints.glob("pretrain.old-*")
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000003", "step-00000006"]


def test_exported_model_reproduces_val_loss(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w")
    cfg = PretrainConfig(**TINY, batch_size=4)
    summary = run(cfg, paths, progress=False)
    model = load_model(paths.models / "pretrain")
    assert model.lm_head.weight is model.tok_emb.weight  # tying survives the safetensors round trip
    val = TokenLoader(paths.tokens / "shards", cfg.seq_len, cfg.batch_size, None, cfg.seed, split="val", val_fraction=cfg.val_fraction)
    assert evaluate(model, val, cfg.eval_batches, torch.device("cpu"), "fp32") == pytest.approx(summary["val_loss"], abs=1e-4)


def test_weight_decay_groups_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_reshard_on_resume(sample_shards, tmp_path, mode):
    """torchrun, 2 processes over gloo, each with half the batch: the same losses as one process
    with the whole batch; then the 2-process checkpoint at step 3 resumes on 1 process."""
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**TINY, batch_size=4), single, progress=False)

    double = workdir(tmp_path, sample_shards, "double")
    summary = pretrain(PretrainConfig(**TINY, batch_size=2, nproc=2, parallel=mode), double)
    assert summary["world_size"] == 2
    assert losses(double) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)

    # resume on 1 process from the 2-process checkpoint at step 3 (DCP reshards the state)
    ckpts = double.checkpoints / "pretrain"
    shutil.rmtree(ckpts / "step-00000006")
    summary = run(PretrainConfig(**TINY, batch_size=4), double, progress=False)
    assert summary["resumed_from_step"] == 3
    assert losses(double) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("routing", ["top1", "domain"])
def test_moe_pretraining_logs_expert_load(sample_shards, tmp_path, routing):
    paths = workdir(tmp_path, sample_shards, "moe")
    model = {**TINY["model"], "moe_layers": "all", "n_experts": 2, "moe_routing": routing}
    if routing == "domain":
        model["n_domains"] = 2  # text and code: the modality is the domain
    cfg = PretrainConfig(**{**TINY, "model": model, "max_steps": 3}, batch_size=4)
    run(cfg, paths, progress=False)
    records = [json.loads(line) for line in (paths.models / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    loads = records[-1]["expert_load"]
    assert len(loads) == 2 and all(len(row) == 2 and abs(sum(row) - 1) < 1e-4 for row in loads)
    assert load_model(paths.models / "pretrain").cfg.moe_routing == routing


def test_activation_checkpointing_keeps_the_losses(sample_shards, tmp_path):
    plain = workdir(tmp_path, sample_shards, "plain")
    recompute = workdir(tmp_path, sample_shards, "recompute")
    run(PretrainConfig(**{**TINY, "max_steps": 3}, batch_size=4), plain, progress=False)
    run(PretrainConfig(**{**TINY, "max_steps": 3}, batch_size=4, activation_checkpointing=True), recompute, progress=False)
    assert losses(recompute) == pytest.approx(losses(plain), rel=1e-6)
