"""3D parallelism on CPU with gloo: tensor parallel (tp=2), pipeline parallel (pp=2, GPipe and 1F1B)
and dp=2 x tp=2 each give the losses of one process at the same global batch; a pp=2 checkpoint
resumes at dp=2 (DCP reshards it); what a 3D run exports loads into the single-process model."""

from __future__ import annotations

import shutil

import pytest
import torch

from fm.config import PretrainConfig
from fm.data.loader import TokenLoader
from fm.models.decoder import Decoder, ModelConfig
from fm.recipes.pretrain import pretrain, run
from fm.train.checkpoint import load_model
from fm.train.loop import evaluate
from fm.train.parallel import Dist, check_layout, stage_layers
from tests.test_train import TINY, losses, workdir

UNTIED = {**TINY, "model": {**TINY["model"], "tie_embeddings": False}}  # pipeline stages cannot share a weight
CLOSE = dict(rel=1e-5, abs=1e-6)


def exported_val_loss(paths, cfg: PretrainConfig) -> float:
    model = load_model(paths.models / "pretrain")
    val = TokenLoader(paths.tokens / "shards", cfg.seq_len, 4, None, cfg.seed, split="val", val_fraction=cfg.val_fraction)
    return evaluate(model, val, cfg.eval_batches, torch.device("cpu"), "fp32")


def test_tensor_parallel_matches_one_process(sample_shards, tmp_path):
    """tp=2 (column/row-parallel blocks, sequence-parallel norms, vocab-parallel tied embedding):
    the same batch on both ranks, the same losses as one process; the export is the whole model."""
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**TINY, batch_size=4), single, progress=False)
    tp = workdir(tmp_path, sample_shards, "tp")
    cfg = PretrainConfig(**TINY, batch_size=4, nproc=2, tp=2)
    summary = pretrain(cfg, tp)
    assert summary["layout"] == {"dp": 1, "pp": 1, "tp": 2}
    assert losses(tp) == pytest.approx(losses(single), **CLOSE)
    assert load_model(tp.models / "pretrain").lm_head.weight is not None
    assert exported_val_loss(tp, cfg) == pytest.approx(summary["val_loss"], abs=1e-4)


def test_pipeline_matches_one_process_resumes_at_dp2_and_exports(sample_shards, tmp_path):
    """pp=2 with 1F1B over 2 microbatches: the losses of one process; its step-3 checkpoint resumes
    at dp=2 (DDP) with the same losses; the export gathers both stages into one loadable model."""
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**UNTIED, batch_size=4), single, progress=False)

    piped = workdir(tmp_path, sample_shards, "pp")
    cfg = PretrainConfig(**UNTIED, batch_size=4, nproc=2, pp=2, pp_microbatches=2, pp_schedule="1f1b")
    summary = pretrain(cfg, piped)
    assert summary["layout"] == {"dp": 1, "pp": 2, "tp": 1}
    assert losses(piped) == pytest.approx(losses(single), **CLOSE)
    assert exported_val_loss(piped, cfg) == pytest.approx(summary["val_loss"], abs=1e-4)

    shutil.rmtree(piped.checkpoints / "pretrain" / "step-00000006")
    summary = pretrain(PretrainConfig(**UNTIED, batch_size=2, nproc=2), piped)  # dp=2: half the batch each
    assert summary["resumed_from_step"] == 3 and summary["layout"] == {"dp": 2, "pp": 1, "tp": 1}
    assert losses(piped) == pytest.approx(losses(single), **CLOSE)


def test_gpipe_with_three_layers_matches_one_process(sample_shards, tmp_path):
    """GPipe, an uneven split (layers 0-1 | 2) and grad_accum=2: the losses of one process."""
    model = {**UNTIED["model"], "n_layer": 3}
    common = {**UNTIED, "model": model, "max_steps": 4, "eval_every": 2, "ckpt_every": 4, "grad_accum": 2}
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**common, batch_size=4), single, progress=False)
    piped = workdir(tmp_path, sample_shards, "pp")
    pretrain(PretrainConfig(**common, batch_size=4, nproc=2, pp=2, pp_microbatches=4, pp_schedule="gpipe"), piped)
    assert losses(piped) == pytest.approx(losses(single), **CLOSE)


def test_data_and_tensor_parallel_match_one_process(sample_shards, tmp_path):
    """dp=2 x tp=2 on 4 processes (FSDP2 over dp of the tp-sharded DTensors), then resumed on 1 process."""
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**TINY, batch_size=4), single, progress=False)
    grid = workdir(tmp_path, sample_shards, "dp_tp")
    summary = pretrain(PretrainConfig(**TINY, batch_size=2, nproc=4, tp=2, parallel="fsdp"), grid)
    assert summary["layout"] == {"dp": 2, "pp": 1, "tp": 2}
    assert losses(grid) == pytest.approx(losses(single), **CLOSE)
    shutil.rmtree(grid.checkpoints / "pretrain" / "step-00000006")
    summary = run(PretrainConfig(**TINY, batch_size=4), grid, progress=False)
    assert summary["resumed_from_step"] == 3
    assert losses(grid) == pytest.approx(losses(single), **CLOSE)


def test_rank_coordinates_follow_the_mesh_order():
    """Mesh (pp, dp, tp), row-major: tp varies fastest, pp slowest."""
    coords = [(d.pp_rank, d.dp_rank, d.tp_rank) for d in (Dist(rank=r, world_size=8, tp_size=2, pp_size=2) for r in range(8))]
    assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert Dist(rank=3, world_size=4).dp_rank == 3 and Dist(rank=3, world_size=4).dp_size == 4


def test_stage_layers_cover_the_model_once():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]


def test_layout_errors_are_clear():
    with pytest.raises(ValueError, match=r"nproc \(6\) must be dp \* tp \* pp"):
        PretrainConfig(nproc=6, tp=2, pp=2)
    with pytest.raises(ValueError, match="pp_microbatches"):
        PretrainConfig(nproc=2, pp=2, batch_size=3, pp_microbatches=2)
    with pytest.raises(ValueError, match="parallel=fsdp"):
        PretrainConfig(nproc=4, tp=2, parallel="ddp")
    with pytest.raises(ValueError, match="pp_schedule"):
        PretrainConfig(pp_schedule="zb")
    tiny = ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        check_layout(tiny, 1, 2)
    with pytest.raises(ValueError, match="n_head"):
        check_layout(tiny, 8, 1)
    check_layout(ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32, tie_embeddings=False), 2, 2)


def test_stage_model_keeps_the_decoder_names():
    """A pipeline stage's parameter names are the Decoder's, so DCP maps them between layouts."""
    from fm.train.parallel import PipelineStageModel

    model = Decoder(ModelConfig(vocab_size=64, seq_len=16, n_layer=3, n_head=2, d_model=32, tie_embeddings=False))
    names = set(model.state_dict())
    first = PipelineStageModel(model, stage_layers(3, 2, 0), 0, 2)
    last = PipelineStageModel(model, stage_layers(3, 2, 1), 1, 2)
    assert set(first.state_dict()) | set(last.state_dict()) == names
    assert not set(first.state_dict()) & set(last.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(last(first(idx)), model(idx)[0])  # the two stages compose to the model


def test_pipeline_with_tensor_parallel_matches_one_process(sample_shards, tmp_path):
    """pp=2 x tp=2 on 4 processes: sequence-sharded hidden states (B, T/2, C) pass between the stages."""
    single = workdir(tmp_path, sample_shards, "single")
    run(PretrainConfig(**UNTIED, batch_size=4), single, progress=False)
    grid = workdir(tmp_path, sample_shards, "pp_tp")
    summary = pretrain(PretrainConfig(**UNTIED, batch_size=4, nproc=4, pp=2, tp=2), grid)
    assert summary["layout"] == {"dp": 1, "pp": 2, "tp": 2}
    assert losses(grid) == pytest.approx(losses(single), **CLOSE)
