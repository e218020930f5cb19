"""Pretraining as a user meets it: training longer continues the run, another run never deletes
checkpoints (they are set aside), `fresh`, the data identity down to each shard's sha256, domain
routing and cpu_offload as the README writes them, layout errors before torchrun, a loadable model
folder, MoE expert load in the log and summary, and a warmup longer than the run."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fm.recipes.pretrain as recipe
import fm.train.loop as loop
from fm.config import PretrainConfig, ShardConfig
from fm.data.shards import load_manifest, write_shards
from fm.models import Decoder, ModelConfig, load_pretrained
from fm.paths import Paths
from fm.recipes.pretrain import model_config, pretrain, run, run_identity, schedule_of
from fm.train.session import identity_hash, plan_start
from fm.train.checkpoint import latest_checkpoint, load_checkpoint
from fm.train.optim import build_optimizer, effective_warmup, lr_at
from tests.test_train import TINY, losses, workdir


def cfg_of(**changes) -> PretrainConfig:
    return PretrainConfig(**{**TINY, "batch_size": 4, **changes})


def records(paths: Paths) -> list[dict]:
    return [json.loads(line) for line in (paths.models / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def set_aside_dirs(paths: Paths) -> list:
    return sorted(paths.checkpoints.glob("pretrain.old-*"))


def crash_at(monkeypatch, step0: int) -> None:
    """Make the training loop raise at 0-based step `step0` (after the checkpoints before it)."""
    def lr(step, *args):
        if step == step0:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", lr)


# ------------------------------------------------------------------ item 1: continue, resume, set aside


def test_training_longer_continues_the_run_and_a_crash_in_the_continuation_resumes_exactly(
        sample_shards, tmp_path, monkeypatch, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(), paths, progress=False)
    six = losses(paths)
    capsys.readouterr()

    summary = run(cfg_of(max_steps=12), paths, progress=False)
    assert summary["resumed_from_step"] == 6 and summary["continued_from_step"] == 6
    assert summary["previous_max_steps"] == 6 and summary["previous_schedule"] == {"max_steps": 6}
    assert "continuing the run from step 6" in capsys.readouterr().err
    assert not set_aside_dirs(paths)
    continued = records(paths)
    assert [r["loss"] for r in continued[:6]] == six  # the first six steps are the first run's
    # the LR schedule is recomputed for the new length from step 6 on
    assert [r["lr"] for r in continued[6:]] == [lr_at(s, 3e-3, 2, 12, 0.1) for s in range(6, 12)]
    meta = json.loads((paths.models / "pretrain" / "config.json").read_text())
    assert [(h["from_step"], h["max_steps"]) for h in meta["schedule_history"]] == [(0, 6), (6, 12)]

    # The same continuation crashing after its step-9 checkpoint resumes bit-identically.
    other = workdir(tmp_path, sample_shards, "crashed")
    run(cfg_of(), other, progress=False)
    crash_at(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg_of(max_steps=12), other, progress=False)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    summary = run(cfg_of(max_steps=12), other, progress=False)
    assert summary["resumed_from_step"] == 9 and "continued_from_step" not in summary
    assert losses(other) == [r["loss"] for r in continued]  # bit-identical
    meta = json.loads((other.models / "pretrain" / "config.json").read_text())
    assert [(h["from_step"], h["max_steps"]) for h in meta["schedule_history"]] == [(0, 6), (6, 12)]


def test_a_finished_run_is_not_trained_again(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    first = run(cfg_of(), paths, progress=False)
    weights = load_file(str(paths.models / "pretrain" / "model.safetensors"))
    capsys.readouterr()
    again = run(cfg_of(), paths, progress=False)
    assert "already trained to step 6" in capsys.readouterr().err
    assert again["resumed_from_step"] == 6 and "tokens_per_s" not in again  # no step was trained
    assert again["final_loss"] == first["final_loss"] and again["val_curve"] == first["val_curve"]
    assert len(records(paths)) == 6
    reloaded = load_file(str(paths.models / "pretrain" / "model.safetensors"))
    assert all(torch.equal(weights[k], reloaded[k]) for k in weights) and weights.keys() == reloaded.keys()


def test_another_model_sets_the_old_checkpoints_aside(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(max_steps=3), paths, progress=False)
    capsys.readouterr()
    summary = run(cfg_of(max_steps=3, model={**TINY["model"], "d_model": 32}), paths, progress=False)
    assert summary["resumed_from_step"] == 0
    (aside,) = set_aside_dirs(paths)
    assert summary["set_aside"] == str(aside)
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step-00000003"]  # nothing deleted
    err = capsys.readouterr().err.splitlines()
    why = [line for line in err if "another run (model differs)" in line]
    where = [line for line in err if "set aside in" in line]
    assert len(why) == 1 and "training from step 0" in why[0]
    assert len(where) == 1 and str(aside) in where[0] and "up to step 3" in where[0]
    assert [p.name for p in (paths.checkpoints / "pretrain").glob("step-*")] == ["step-00000003"]
    assert len(records(paths)) == 3


def test_changed_lr_continues_an_unfinished_run_and_restarts_a_finished_one(sample_shards, tmp_path, monkeypatch):
    paths = workdir(tmp_path, sample_shards, "w")
    crash_at(monkeypatch, 4)  # after the checkpoint at step 3
    with pytest.raises(RuntimeError):
        run(cfg_of(), paths, progress=False)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    summary = run(cfg_of(lr=1e-3), paths, progress=False)
    assert summary["continued_from_step"] == 3 and summary["previous_schedule"] == {"lr": 3e-3}
    assert [r["lr"] for r in records(paths)[3:]] == [lr_at(s, 1e-3, 2, 6, 0.1) for s in range(3, 6)]
    # The run is now finished at step 6 with lr 1e-3: going back to 3e-3 cannot continue anything.
    summary = run(cfg_of(), paths, progress=False)
    assert summary["resumed_from_step"] == 0 and len(set_aside_dirs(paths)) == 1


def test_fresh_sets_checkpoints_aside_and_trains_from_step_zero(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(max_steps=3), paths, progress=False)
    first = losses(paths)
    summary = pretrain(cfg_of(max_steps=3), paths, fresh=True)
    assert summary["resumed_from_step"] == 0
    (aside,) = set_aside_dirs(paths)
    assert (aside / "step-00000003" / "train_state.json").is_file()
    assert losses(paths) == first  # the same configuration trained again from scratch


def test_main_fresh_flag_and_readable_closing_line(sample_shards, tmp_path, capsys):
    """`python -m fm.recipes.pretrain` (and each torchrun process) ends with one readable line, not JSON;
    --quiet (what the stage passes to torchrun) prints nothing; --fresh starts over."""
    paths = workdir(tmp_path, sample_shards, "w")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg_of(max_steps=3))))
    args = ["--config", str(config), "--raw", str(paths.raw), "--workdir", str(paths.workdir)]
    recipe.main(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("pretrain: 3 steps loss ") and "{" not in out[0]
    recipe.main(args + ["--quiet", "--fresh"])
    assert capsys.readouterr().out == ""
    assert len(set_aside_dirs(paths)) == 1


# ------------------------------------------------------------------ item 2: the data identity


def test_run_identity_includes_every_token_shard_checksum(sample_shards):
    manifest = load_manifest(sample_shards.tokens / "shards")
    cfg = cfg_of()
    base = run_identity(cfg, manifest, 1, ["text", "code"])
    resharded = json.loads(json.dumps(manifest))
    entry = next(e for e in resharded["shards"] if e["kind"] == "tokens")
    entry["sha256"] = "0" * 64  # same tokenizer, same token total, another shard content
    other = run_identity(cfg, resharded, 1, ["text", "code"])
    assert identity_hash(other) != identity_hash(base)
    saved = {"run_identity": identity_hash(base), "run": base, "schedule": schedule_of(cfg), "step": 6}
    assert plan_start(saved, other, schedule_of(cfg)) == ("set_aside", "another run (data differs)")
    assert plan_start(saved, base, schedule_of(cfg)) == ("resume", "")


def test_resharding_with_another_seed_does_not_resume(sample_shards, tmp_path):
    """The same corpus sharded with shard.seed=1: the same tokenizer and token total, other shards."""
    resharded = Paths(sample_shards.raw, tmp_path / "reshard")
    shutil.copytree(sample_shards.curated, resharded.curated)
    resharded.tokens.mkdir(parents=True)
    shutil.copy(sample_shards.tokens / "tokenizer.json", resharded.tokens / "tokenizer.json")
    write_shards(ShardConfig(tokens_per_shard=40_000, seed=1), resharded)

    paths = workdir(tmp_path, sample_shards, "w")
    run(cfg_of(max_steps=3), paths, progress=False)
    (paths.workdir / "05_tokens").unlink()
    (paths.workdir / "05_tokens").symlink_to(resharded.tokens, target_is_directory=True)
    summary = run(cfg_of(max_steps=3), paths, progress=False)
    assert summary["resumed_from_step"] == 0 and len(set_aside_dirs(paths)) == 1


# ------------------------------------------------------------------ item 4: domain routing as the README writes it


def test_domain_routing_defaults_to_one_expert_per_modality(sample_shards, tmp_path):
    moe = {**TINY["model"], "moe_layers": "all", "moe_routing": "domain"}
    mcfg = model_config(cfg_of(model=moe), 512)
    assert mcfg.n_domains == mcfg.n_experts == 4  # text, code, image_text, triples
    paths = workdir(tmp_path, sample_shards, "w")
    summary = run(cfg_of(model=moe, max_steps=2), paths, progress=False)
    for row in summary["expert_load"]:  # the sample has text (domain 0) and code (domain 1) only
        assert len(row) == 4 and row[2] == row[3] == 0 and sum(row) == pytest.approx(1, abs=1e-3)
    assert model_config(cfg_of(model={**moe, "n_experts": 2}), 512).n_domains == 2
    with pytest.raises(ValueError, match="code is domain 1, but model.n_domains is 1"):
        run(cfg_of(model={**moe, "n_experts": 1}), paths, progress=False)


# ------------------------------------------------------------------ item 5: cpu_offload on a CPU-only machine


def test_cpu_offload_is_a_noop_with_a_note_on_cpu(sample_shards, tmp_path, capfd):
    single = workdir(tmp_path, sample_shards, "single")
    run(cfg_of(max_steps=3), single, progress=False)
    capfd.readouterr()
    offload = workdir(tmp_path, sample_shards, "offload")
    pretrain(cfg_of(max_steps=3, batch_size=2, nproc=2, parallel="fsdp", cpu_offload=True), offload)
    err = capfd.readouterr().err
    assert err.count("cpu_offload is a no-op here") == 1 and "Traceback" not in err
    assert losses(offload) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ item 6: layout errors before torchrun


@pytest.mark.parametrize("changes, message", [
    (dict(model={**TINY["model"], "moe_layers": "all", "n_experts": 2}, nproc=2, tp=2), "tp > 1 supports dense MLPs only"),
    (dict(nproc=2, pp=2), "tie_embeddings=false"),
    (dict(model={**TINY["model"], "n_head": 1}, nproc=2, tp=2), "pretrain.tp=2 must divide model.n_head"),
])
def test_layout_errors_are_one_line_before_torchrun(sample_shards, tmp_path, monkeypatch, changes, message):
    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr(recipe, "launch_recipe", no_launch)
    paths = workdir(tmp_path, sample_shards, "w")
    with pytest.raises(ValueError, match=message):
        pretrain(cfg_of(**changes), paths)
    with pytest.raises(FileNotFoundError, match="run `fm shard` first"):
        pretrain(cfg_of(**changes), Paths(paths.raw, tmp_path / "empty"))


# ------------------------------------------------------------------ item 7: a loadable model folder


def test_load_pretrained_gives_the_trained_model_and_its_tokenizer(sample_shards, tmp_path):
    paths = workdir(tmp_path, sample_shards, "w")
    cfg = cfg_of()
    run(cfg, paths, progress=False)
    folder = paths.models / "pretrain"
    model, tokenizer = load_pretrained(folder)

    # The reference: the training state of the last step, restored from its DCP checkpoint.
    mcfg = model_config(cfg, load_manifest(paths.tokens / "shards")["tokenizer"]["vocab_size"])
    trained = Decoder(mcfg)
    load_checkpoint(latest_checkpoint(paths.checkpoints / "pretrain"), trained,
                    build_optimizer(trained, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)))
    ids = tokenizer.encode("def add(a, b):\n    return a + b").ids
    assert 0 < len(ids) and max(ids) < mcfg.vocab_size
    idx = torch.tensor([ids[:cfg.seq_len]])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], trained(idx)[0])
        # The same without fm's loader: config.json's "model" and a strict load_state_dict.
        plain = Decoder(ModelConfig(**json.loads((folder / "config.json").read_text())["model"]))
        plain.load_state_dict(load_file(str(folder / "model.safetensors")))
        assert torch.equal(plain(idx)[0], trained(idx)[0])
        assert plain.lm_head.weight is plain.tok_emb.weight
    assert json.loads((folder / "config.json").read_text())["tokenizer"]["path"] == "tokenizer.json"
    assert tokenizer.decode(ids) .replace(" ", "") == "def add(a, b):\n    return a + b".replace(" ", "")


# ------------------------------------------------------------------ item 8: MoE expert load where a user looks


def test_moe_expert_load_in_the_log_line_and_summary(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    moe = {**TINY["model"], "moe_layers": "all", "n_experts": 2, "moe_routing": "top1"}
    summary = run(cfg_of(model=moe, max_steps=3), paths, progress=False)
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 3/3")]
    assert len(last) == 1 and " moe load " in last[0] and "(even 0.50)" in last[0]
    loads = torch.tensor([r["expert_load"] for r in records(paths)], dtype=torch.float64).mean(dim=0)  # (layers, E)
    assert summary["expert_load"] == [[round(v, 4) for v in row] for row in loads.tolist()]
    cv = loads.std(dim=1, correction=0) / loads.mean(dim=1)
    assert summary["expert_load_cv"] == pytest.approx(cv.tolist(), abs=1e-4)
    assert "expert load cv" in recipe.describe(summary)


# ------------------------------------------------------------------ item 10: a warmup as long as the run


def test_warmup_as_long_as_the_run_becomes_a_tenth_of_it():
    assert effective_warmup(20, 200) == 20 and effective_warmup(19, 20) == 19
    assert effective_warmup(20, 20) == 2 and effective_warmup(50, 20) == 2 and effective_warmup(20, 6) == 0
    assert lr_at(0, 1.0, 20, 20, 0.1) == pytest.approx(0.5)  # step 1 of a 2-step warmup
    assert lr_at(1, 1.0, 20, 20, 0.1) == pytest.approx(1.0)
    assert lr_at(20, 1.0, 20, 20, 0.1) == pytest.approx(0.1)  # decayed to min_lr at the end
    assert lr_at(0, 1.0, 20, 6, 0.1) == pytest.approx(1.0)  # no warmup left in 6 steps


def test_summary_records_the_warmup_used(sample_shards, tmp_path, capsys):
    paths = workdir(tmp_path, sample_shards, "w")
    assert run(cfg_of(max_steps=3), paths, progress=False)["warmup_steps"] == 2
    long_warmup = workdir(tmp_path, sample_shards, "long_warmup")
    summary = run(cfg_of(max_steps=3, warmup_steps=20), long_warmup, progress=False)
    assert summary["warmup_steps"] == 0
    assert "warmup_steps (20) >= max_steps (3): warming up over 0 steps" in capsys.readouterr().err
    assert [r["lr"] for r in records(long_warmup)] == [lr_at(s, 3e-3, 0, 3, 0.1) for s in range(3)]
    rows = (long_warmup.models / "pretrain" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,val_loss,lr" and len(rows) == 4 and rows[3].startswith("3,")
