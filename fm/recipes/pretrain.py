"""Pretrain a decoder LM on the token shards: the `pretrain` stage.

    fm pretrain                                   # the stage; launches torchrun when pretrain.nproc > 1
    torchrun --nproc_per_node 2 -m fm.recipes.pretrain --set pretrain.parallel=fsdp
    torchrun --nproc_per_node 4 -m fm.recipes.pretrain --set pretrain.tp=2 --set pretrain.parallel=fsdp   # dp 2 x tp 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             --nproc_per_node 8 -m fm.recipes.pretrain       # multi-node

Reads `05_tokens/shards` (and the tokenizer's vocabulary size from its manifest), builds the
model from `pretrain.preset` + `pretrain.model`, and trains with fm.train.loop.train.
Writes:
    06_models/checkpoints/pretrain/step-XXXXXXXX/   full training state (DCP) every ckpt_every steps;
                                                    a rerun with the same config resumes from the newest
    06_models/pretrain/model.safetensors, config.json, metrics.jsonl, summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fm.config import PretrainConfig, load_params
from fm.data.loader import TokenLoader
from fm.data.shards import load_manifest
from fm.io import atomic_dir
from fm.models.decoder import PRESETS, Decoder, ModelConfig
from fm.paths import Paths
from fm.train.checkpoint import clear_checkpoints, export_model, load_checkpoint, resume_point, save_checkpoint
from fm.train.loop import measure_matmul_peak, train
from fm.train.optim import build_optimizer
from fm.train.parallel import Dist, destroy_distributed, init_distributed, parallelize

# Settings that change how a run is executed but not the numbers it computes: a checkpoint
# written under one of them resumes under another (different process count, FSDP vs DDP, ...).
# The 3D layout (tp, pp and its schedule) is one of them: DCP reshards a checkpoint into any layout.
EXECUTION_ONLY = ("batch_size", "grad_accum", "nproc", "parallel", "cpu_offload", "activation_checkpointing",
                  "compile", "threads", "peak_tflops", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
                  "tp", "pp", "pp_microbatches", "pp_schedule")


def model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    if cfg.preset not in PRESETS:
        raise ValueError(f"pretrain.preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    overrides = {**cfg.model, "vocab_size": vocab_size, "seq_len": cfg.seq_len}
    # Fields the preset derived from the ones being overridden are derived again.
    for given, derived in (("n_head", "n_kv_head"), ("d_model", "ffn_hidden")):
        if given in overrides and derived not in overrides:
            overrides[derived] = None
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"pretrain.model: unknown model setting(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(PRESETS[cfg.preset], **overrides)


def resolve_dtype(cfg: PretrainConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def config_hash(cfg: PretrainConfig, manifest: dict, dp_size: int) -> str:
    """What a resumable checkpoint must agree on: the math of the run and the data it reads."""
    math_settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY}
    math_settings["global_batch"] = cfg.batch_size * cfg.grad_accum * dp_size  # only dp splits the batch
    data = {"tokenizer": manifest["tokenizer"]["sha256"], "totals": manifest["totals"]["tokens"]}
    return hashlib.sha256(json.dumps([math_settings, data], sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: PretrainConfig, paths: Paths, progress: bool = True) -> dict:
    """Train in this process (one of torchrun's, or alone) and return the summary (rank 0)."""
    d = init_distributed(tp=cfg.tp, pp=cfg.pp)
    try:
        return _run(cfg, paths, d, progress)
    finally:
        destroy_distributed()


def _run(cfg: PretrainConfig, paths: Paths, d: Dist, progress: bool) -> dict:
    start = time.perf_counter()
    shard_dir = paths.tokens / "shards"
    if not (shard_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{shard_dir} has no manifest.json: run `fm shard` first")
    manifest = load_manifest(shard_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if d.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats are 10-100x slower on CPUs and carry no signal
    dtype = resolve_dtype(cfg, d.device)

    mcfg = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on every resume
    model = Decoder(mcfg).to(d.device)
    peak = cfg.peak_tflops * 1e12 or measure_matmul_peak(d.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    model, pipeline = parallelize(model, d, cfg)  # pipeline: None unless pp > 1
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))

    # Ranks that differ only in their tp or pp coordinate read the same batch: the data rank is the dp one.
    loader = TokenLoader(shard_dir, cfg.seq_len, cfg.batch_size, cfg.mix or None, cfg.seed, d.dp_rank, d.dp_size,
                         split="train", val_fraction=cfg.val_fraction)
    val_loader = None
    if cfg.val_fraction > 0:
        try:
            val_loader = TokenLoader(shard_dir, cfg.seq_len, cfg.batch_size, cfg.mix or None, cfg.seed, d.dp_rank,
                                     d.dp_size, split="val", val_fraction=cfg.val_fraction)
        except ValueError as e:  # a corpus too small to hold out a single window
            print(f"pretrain: no validation ({e})", file=sys.stderr)

    ckpt_root = paths.checkpoints / "pretrain"
    chash = config_hash(cfg, manifest, d.dp_size)
    start_step = 0
    resume_from = resume_point(ckpt_root, chash, d)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
    if d.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if resume_from is None and clear_checkpoints(ckpt_root):
            # Another configuration's state can never be resumed by this run, and left in place
            # it would outrank (and get this run's own checkpoints pruned) by step number.
            print(f"pretrain: removed checkpoints of another configuration from {ckpt_root}", file=sys.stderr)
        _truncate_metrics(ckpt_root / "metrics.jsonl", start_step)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_root, step, model, optimizer,
                        {"loader": loader.state_dict(), "config_hash": chash, "config": dataclasses.asdict(cfg)},
                        d, keep=cfg.keep_checkpoints)

    bar = _progress() if (progress and d.is_main) else nullcontext(None)
    with bar as prog:
        history = train(model, optimizer, loader, cfg, d, val_loader=val_loader, start_step=start_step,
                        checkpoint_fn=checkpoint, metrics_path=ckpt_root / "metrics.jsonl",
                        flops_per_token=mcfg.flops_per_token(cfg.seq_len), peak_flops=peak, progress=prog,
                        pipeline=pipeline)

    if not cfg.peak_tflops:
        # A peak measured while other work shared the device reads low (and MFU high): measure
        # again now and keep the larger, for the summary's MFU; per-step MFU used the first.
        end_peak = measure_matmul_peak(d.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
        if end_peak > peak:
            for r in history:
                if "mfu" in r:
                    r["mfu"] = round(r["mfu"] * peak / end_peak, 4)
            peak = end_peak
    summary = {"stage": "pretrain", "resumed_from_step": start_step, "steps": cfg.max_steps,
               "params": mcfg.num_params(), "world_size": d.world_size,
               "layout": {"dp": d.dp_size, "pp": d.pp_size, "tp": d.tp_size}, "dtype": dtype,
               "device": str(d.device.type), "peak_tflops": round(peak / 1e12, 3)}
    if history:
        tail = history[-min(10, len(history)):]
        summary.update(final_loss=round(history[-1]["loss"], 4),
                       tokens_per_s=round(sum(r["tokens_per_s"] for r in tail) / len(tail), 1))
        if "mfu" in history[-1]:
            summary["mfu"] = round(sum(r["mfu"] for r in tail) / len(tail), 4)
        vals = [r["val_loss"] for r in history if "val_loss" in r]
        if vals:
            summary["val_loss"] = round(vals[-1], 4)
    out = paths.models / "pretrain"
    meta = {"tokenizer": manifest["tokenizer"], "pretrain": dataclasses.asdict(cfg), "step": cfg.max_steps}
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        export_model(model, mcfg, tmp, d, meta)  # collective: every rank gathers, rank 0 writes
        if d.is_main:
            metrics = (ckpt_root / "metrics.jsonl").read_text()
            (tmp / "metrics.jsonl").write_text(metrics)
            summary["val_curve"] = [(r["step"], round(r["val_loss"], 4)) for r in map(json.loads, metrics.splitlines()) if "val_loss" in r]
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["outputs"] = [str(out)]
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep metric lines up to `step`: a resumed run rewrites what came after its checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def pretrain(cfg: PretrainConfig, paths: Paths) -> dict:
    """The pretrain stage: train in this process, or launch torchrun when cfg.nproc > 1."""
    if cfg.nproc == 1:
        return run(cfg, paths)
    launch = paths.checkpoints / "pretrain" / "launch.json"
    launch.parent.mkdir(parents=True, exist_ok=True)
    launch.write_text(json.dumps(dataclasses.asdict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
           "-m", "fm.recipes.pretrain", "--config", str(launch), "--raw", str(paths.raw), "--workdir", str(paths.workdir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc)))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {result.returncode}: {' '.join(cmd)}")
    summary = json.loads((paths.models / "pretrain" / "summary.json").read_text())
    summary["outputs"] = [str(paths.models / "pretrain")]
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain a decoder LM on fm token shards (run under torchrun for several processes).")
    ap.add_argument("--params", default="params.yaml", help="params file; its `pretrain` section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. pretrain.max_steps=50")
    ap.add_argument("--config", help="a resolved PretrainConfig as JSON (what the stage passes to torchrun); replaces --params/--set")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    args = ap.parse_args(argv)
    if args.config:
        cfg = PretrainConfig(**json.loads(Path(args.config).read_text()))
    else:
        cfg = load_params(args.params, args.overrides).pretrain
    summary = run(cfg, Paths(args.raw, args.workdir))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "val_curve"}))


if __name__ == "__main__":
    main()
