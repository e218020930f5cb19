"""Dropout RNG: a stream per data-parallel rank (the same within a tp group), every rank's state in the
checkpoint, and a 2-process run with dropout resumed from its step-3 checkpoint bit-identical to an
uninterrupted one; on another layout the stream is re-seeded from seed, dp rank and step, with a note."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fm.config import PretrainConfig
from fm.recipes.pretrain import pretrain, run
from fm.train.checkpoint import RNG_FILE, seed_rng
from fm.train.parallel import Dist
from tests.test_train import TINY, losses, workdir

DROPOUT = {**TINY, "model": {**TINY["model"], "dropout": 0.2}}


def dropout_mask(d: Dist, seed: int = 1337) -> torch.Tensor:
    seed_rng(seed, d)
    return torch.nn.functional.dropout(torch.ones(64), p=0.5) > 0


def test_dropout_masks_differ_across_dp_ranks_and_agree_within_a_tp_group():
    dp = [dropout_mask(Dist(rank=r, world_size=2)) for r in range(2)]
    assert not torch.equal(dp[0], dp[1])
    grid = [dropout_mask(Dist(rank=r, world_size=4, tp_size=2)) for r in range(4)]  # (dp, tp): 00 01 10 11
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[2], grid[3]) and not torch.equal(grid[0], grid[2])
    assert torch.equal(grid[0], dp[0])  # the same dp rank, the same stream, whatever the tp size
    assert not torch.equal(dropout_mask(Dist(), seed=1337), dropout_mask(Dist(), seed=1338))


def test_two_process_dropout_run_resumes_bit_identical_with_a_state_per_rank(sample_shards, tmp_path, capsys):
    straight = workdir(tmp_path, sample_shards, "straight")
    cfg = PretrainConfig(**DROPOUT, batch_size=2, nproc=2)
    pretrain(cfg, straight)
    root = straight.checkpoints / "pretrain"
    for step in ("step-00000003", "step-00000006"):
        states = sorted(p.name for p in (root / step).glob("rng-*.json"))
        assert states == [RNG_FILE.format(rank=r) for r in range(2)]
        rank0, rank1 = (json.loads((root / step / name).read_text()) for name in states)
        assert rank0["torch"] != rank1["torch"]  # each rank's own dropout stream
        assert {"rng-00000.json", "rng-00001.json"} <= json.loads((root / step / "checksums.json").read_text())["files"].keys()

    # The same run stopped after its step-3 checkpoint (the step-6 one never written) and resumed.
    stopped = workdir(tmp_path, sample_shards, "stopped")
    shutil.copytree(root, stopped.checkpoints / "pretrain")
    shutil.rmtree(stopped.checkpoints / "pretrain" / "step-00000006")
    summary = pretrain(cfg, stopped)
    assert summary["resumed_from_step"] == 3
    assert losses(stopped) == losses(straight)  # bit-identical, dropout included

    # Dropout is really drawn: the same run without it has other losses.
    plain = workdir(tmp_path, sample_shards, "plain")
    pretrain(PretrainConfig(**TINY, batch_size=2, nproc=2), plain)
    assert losses(plain) != losses(straight)

    # On one process the 2-process states do not apply: re-seeded from seed, dp rank and step, with a note.
    capsys.readouterr()
    shutil.rmtree(stopped.checkpoints / "pretrain" / "step-00000006")
    summary = run(PretrainConfig(**DROPOUT, batch_size=4), stopped, progress=False)
    assert summary["resumed_from_step"] == 3
    notes = [line for line in capsys.readouterr().err.splitlines() if "dropout re-seeded" in line]
    assert len(notes) == 1 and "no RNG state for this process layout" in notes[0]
    assert losses(stopped)[:3] == losses(straight)[:3] and len(losses(stopped)) == 6


def test_one_process_dropout_run_resumes_bit_identical(sample_shards, tmp_path):
    straight = workdir(tmp_path, sample_shards, "straight")
    cfg = PretrainConfig(**DROPOUT, batch_size=4)
    run(cfg, straight, progress=False)
    stopped = workdir(tmp_path, sample_shards, "stopped")
    shutil.copytree(straight.checkpoints / "pretrain", stopped.checkpoints / "pretrain")
    shutil.rmtree(stopped.checkpoints / "pretrain" / "step-00000006")
    assert run(cfg, stopped, progress=False)["resumed_from_step"] == 3
    assert losses(stopped) == losses(straight)
