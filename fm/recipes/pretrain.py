"""Pretrain a decoder LM on the token shards: the `pretrain` stage.

    fm pretrain                                   # the stage; launches torchrun when pretrain.nproc > 1
    python -m fm.recipes.pretrain --fresh         # one process; --fresh sets old checkpoints aside, starts at step 0
    torchrun --nproc_per_node 2 -m fm.recipes.pretrain --set pretrain.parallel=fsdp
    torchrun --nproc_per_node 4 -m fm.recipes.pretrain --set pretrain.tp=2 --set pretrain.parallel=fsdp   # dp 2 x tp 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             --nproc_per_node 8 -m fm.recipes.pretrain       # multi-node

Reads `05_tokens/shards` (and the tokenizer its manifest names), builds the model from
`pretrain.preset` + `pretrain.model`, and trains with fm.train.loop.train.
Writes:
    06_models/checkpoints/pretrain/step-XXXXXXXX/   full training state (DCP) every ckpt_every steps
    06_models/pretrain/model.safetensors, config.json, tokenizer.json, metrics.jsonl, summary.json
                                                    (load with fm.models.load_pretrained)

Where a rerun starts (fm.train.session, shared with sft and distill): the newest checkpoint is
    resumed      when it is this run (same run identity) with the same schedule: a crashed run goes on, and
                 its losses are bit-identical to an uninterrupted run's (dropout too: every rank's RNG state is
                 in the checkpoint; on another process layout it is re-seeded, with a note); at max_steps nothing
                 is trained again;
    continued    when it is this run with another schedule (SCHEDULE: max_steps, warmup_steps, lr,
                 min_lr_ratio, mix) and it is before the new max_steps: training longer, or on with a lower
                 LR or other mixing weights; the LR follows the new schedule from that step on;
    set aside    otherwise (another model, data, seed, global batch, optimizer or set of modalities; a
                 changed schedule at or past its max_steps; or `fresh`): training starts at 0, and when it
                 saves its first checkpoint the old ones move to 06_models/checkpoints/pretrain.old-<run>-<time>/,
                 never deleted. Until then they stay where they are: a run that fails before its first
                 checkpoint leaves the old run resumable by rerunning the old configuration.

What is trusted. The token shards are checked against manifest.json (size, sha256, token ids below
the vocabulary) and the tokenizer against its sha256 before training: once by the stage before torchrun,
once per node otherwise. A checkpoint is resumed only if it matches its checksums.json; a damaged or
incomplete newest one is renamed step-XXXXXXXX.corrupt with a one-line warning and the next older one is
resumed. Killing the stage (Ctrl-C, SIGTERM, SIGKILL) takes torchrun and its workers down with it
(fm.train.launch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fm.config import PretrainConfig, load_params
from fm.data.loader import TokenLoader, verify_token_shards
from fm.data.schema import MODALITIES
from fm.data.shards import load_manifest
from fm.io import sha256_file
from fm.io import atomic_dir
from fm.models.decoder import PRESETS, Decoder, ModelConfig
from fm.paths import Paths
from fm.train.checkpoint import export_model, seed_rng
from fm.train.launch import die_with_parent, launch_recipe
from fm.train.loop import measure_matmul_peak, progress_bar, train
from fm.train.optim import build_optimizer, effective_warmup
from fm.train.parallel import Dist, all_gather_object, check_layout, destroy_distributed, init_distributed, parallelize
from fm.train.session import TrainingSession

# Settings that change how a run is executed but not the numbers it computes: a checkpoint
# written under one of them resumes under another (different process count, FSDP vs DDP, ...).
# The 3D layout (tp, pp and its schedule) is one of them: DCP reshards a checkpoint into any layout.
EXECUTION_ONLY = ("batch_size", "grad_accum", "nproc", "parallel", "cpu_offload", "activation_checkpointing",
                  "compile", "threads", "peak_tflops", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
                  "tp", "pp", "pp_microbatches", "pp_schedule")
# The learning-rate and data schedule: a run continues under new values of these (from its newest
# checkpoint, if that is before the new max_steps). The data loader's state stays valid under a new
# mix as long as it draws from the same modalities, which are part of the run identity.
SCHEDULE = ("max_steps", "warmup_steps", "lr", "min_lr_ratio", "mix")


def model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    if cfg.preset not in PRESETS:
        raise ValueError(f"pretrain.preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    overrides = {**cfg.model, "vocab_size": vocab_size, "seq_len": cfg.seq_len}
    # Fields the preset derived from the ones being overridden are derived again.
    for given, derived in (("n_head", "n_kv_head"), ("d_model", "ffn_hidden")):
        if given in overrides and derived not in overrides:
            overrides[derived] = None
    if overrides.get("moe_routing") == "domain":
        # DEMix: one expert per domain, and a document's modality is its domain (text, code, image_text, triples).
        overrides.setdefault("n_domains", overrides.get("n_experts", len(MODALITIES)))
        overrides.setdefault("n_experts", overrides["n_domains"])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"pretrain.model: unknown model setting(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(PRESETS[cfg.preset], **overrides)


def prepare(cfg: PretrainConfig, paths: Paths, verify: bool = False) -> tuple[Path, dict, ModelConfig]:
    """Everything a run can refuse before it trains: shards and their tokenizer present, the model config,
    its (pp, dp, tp) layout, domain ids; with `verify`, every token shard against manifest.json too (a read
    of all of them: see verify_token_shards). Run once in the stage's own process before torchrun, so a
    mistake is one line rather than a traceback from every process. Returns (shard dir, manifest, model config)."""
    shard_dir = paths.tokens / "shards"
    if not (shard_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{shard_dir} has no manifest.json: run `fm shard` first")
    manifest = load_manifest(shard_dir)
    tokenizer = shard_dir / manifest["tokenizer"]["path"]
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} not found: the shards' tokenizer is missing (run `fm tokenize` and `fm shard`)")
    if sha256_file(tokenizer) != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{tokenizer} does not match its sha256 in {shard_dir / 'manifest.json'}: it is not the tokenizer "
                         f"the shards were made with; rerun `fm shard` (or `fm run --from shard`)")
    if verify:
        verify_token_shards(shard_dir, manifest)
    mcfg = model_config(cfg, manifest["tokenizer"]["vocab_size"])
    check_layout(mcfg, cfg.tp, cfg.pp)
    if mcfg.moe_layers and mcfg.moe_routing == "domain":
        present = {e["modality"] for e in manifest["shards"] if e["kind"] == "tokens"}
        drawn = [m for m in present if not cfg.mix or cfg.mix.get(m, 0) > 0]
        codes = manifest["codes"]["modality"]
        beyond = sorted((m for m in drawn if codes.index(m) >= mcfg.n_domains), key=codes.index)
        if beyond:
            raise ValueError(f"domain routing: {', '.join(f'{m} is domain {codes.index(m)}' for m in beyond)}, but "
                             f"model.n_domains is {mcfg.n_domains} (leave n_experts and n_domains unset for one expert "
                             f"per modality, {len(codes)})")
    return shard_dir, manifest, mcfg


def resolve_dtype(cfg: PretrainConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def run_identity(cfg: PretrainConfig, manifest: dict, dp_size: int, modalities: list[str]) -> dict:
    """What a checkpoint must agree on to be resumed or continued: the model and optimizer, the seed, the
    global batch and the exact data (tokenizer and every token shard's sha256: re-sharding with another
    shard.seed is other data). modalities: those the loader draws from (its state counts per modality)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY + SCHEDULE}
    settings["global_batch"] = cfg.batch_size * cfg.grad_accum * dp_size  # only dp splits the batch
    settings["modalities"] = list(modalities)
    settings["data"] = {"tokenizer": manifest["tokenizer"]["sha256"],
                        "token_shards": sorted([e["path"], e["sha256"]] for e in manifest["shards"] if e["kind"] == "tokens")}
    return settings


def schedule_of(cfg: PretrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in SCHEDULE}


def run(cfg: PretrainConfig, paths: Paths, progress: bool = True, fresh: bool = False, verified: bool = False) -> dict:
    """Train in this process (one of torchrun's, or alone) and return the summary (rank 0).
    verified: the token shards were checked just before (by the stage that launched torchrun)."""
    d = init_distributed(tp=cfg.tp, pp=cfg.pp)
    try:
        return _run(cfg, paths, d, progress, fresh, verified)
    finally:
        destroy_distributed()


def _verify_on_each_node(shard_dir: Path, manifest: dict, d: Dist) -> None:
    """verify_token_shards by local rank 0 of every node (each node reads its own copy of the shards);
    every rank raises the first error, so none waits in a collective for a rank that gave up."""
    error = None
    if d.local_rank == 0:
        try:
            verify_token_shards(shard_dir, manifest)
        except (OSError, ValueError) as e:
            error = (type(e).__name__, str(e))
    for found in all_gather_object(error):
        if found:
            raise (FileNotFoundError if found[0] == "FileNotFoundError" else ValueError)(found[1])


def _run(cfg: PretrainConfig, paths: Paths, d: Dist, progress: bool, fresh: bool, verified: bool) -> dict:
    start = time.perf_counter()
    shard_dir, manifest, mcfg = prepare(cfg, paths)
    if not verified:
        _verify_on_each_node(shard_dir, manifest, d)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if d.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats are 10-100x slower on CPUs and carry no signal
    dtype = resolve_dtype(cfg, d.device)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on every resume
    model = Decoder(mcfg).to(d.device)
    model, pipeline = parallelize(model, d, cfg)  # pipeline: None unless pp > 1
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    seed_rng(cfg.seed, d)  # dropout: a stream per data-parallel rank from here on (a resume restores it below)

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
    identity, schedule = run_identity(cfg, manifest, d.dp_size, loader.modalities), schedule_of(cfg)
    session = TrainingSession("pretrain", ckpt_root, identity, schedule, d, fresh)
    start_step = session.start(model, optimizer, loader, cfg.seed)
    warmup = effective_warmup(cfg.warmup_steps, cfg.max_steps)
    if warmup != cfg.warmup_steps and d.is_main and start_step < cfg.max_steps:
        print(f"pretrain: warmup_steps ({cfg.warmup_steps}) >= max_steps ({cfg.max_steps}): warming up over "
              f"{warmup} steps (a tenth of the run) instead", file=sys.stderr)

    def checkpoint(step: int) -> None:
        session.save(step, model, optimizer, loader, {"config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    to_train = start_step < cfg.max_steps
    peak = cfg.peak_tflops * 1e12 or (measure_matmul_peak(d.device, _matmul_dtype(dtype)) if to_train else 0.0)
    bar = progress_bar() if (progress and d.is_main and to_train) else nullcontext(None)
    with bar as prog:
        # the loop gets the resolved dtype: "auto" is bf16 autocast on a GPU that has it
        history = train(model, optimizer, loader, dataclasses.replace(cfg, dtype=dtype), d, val_loader=val_loader,
                        start_step=start_step,
                        checkpoint_fn=checkpoint, metrics_path=session.metrics_path,
                        flops_per_token=mcfg.flops_per_token(cfg.seq_len), peak_flops=peak, progress=prog,
                        pipeline=pipeline)
    session.finish()

    if history and not cfg.peak_tflops:
        # A peak measured while other work shared the device reads low (and MFU high): measure
        # again now and keep the larger, for the summary's MFU; per-step MFU used the first.
        end_peak = measure_matmul_peak(d.device, _matmul_dtype(dtype))
        if end_peak > peak:
            for r in history:
                if "mfu" in r:
                    r["mfu"] = round(r["mfu"] * peak / end_peak, 4)
            peak = end_peak
    summary = {"stage": "pretrain", "resumed_from_step": start_step, **session.summary_extra, "steps": cfg.max_steps,
               "warmup_steps": warmup, "params": mcfg.num_params(), "world_size": d.world_size,
               "layout": {"dp": d.dp_size, "pp": d.pp_size, "tp": d.tp_size}, "dtype": dtype,
               "device": str(d.device.type)}
    if history:  # throughput of the steps this call trained
        summary["peak_tflops"] = round(peak / 1e12, 3)
        tail = history[-min(10, len(history)):]
        summary["tokens_per_s"] = round(sum(r["tokens_per_s"] for r in tail) / len(tail), 1)
        if "mfu" in history[-1]:
            summary["mfu"] = round(sum(r["mfu"] for r in tail) / len(tail), 4)
    out = paths.models / "pretrain"
    meta = {"tokenizer": {**manifest["tokenizer"], "path": "tokenizer.json"}, "pretrain": dataclasses.asdict(cfg),
            "step": cfg.max_steps, "schedule_history": session.schedule_history}
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        export_model(model, mcfg, tmp, d, meta)  # collective: every rank gathers, rank 0 writes
        if d.is_main:
            shutil.copyfile(shard_dir / manifest["tokenizer"]["path"], tmp / "tokenizer.json")  # a self-contained folder
            records, _ = session.write_records(tmp)
            summary.update(_run_figures(records))
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["outputs"] = [str(out)]
    return summary


def _matmul_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def _run_figures(records: list[dict]) -> dict:
    """Loss, validation curve and MoE expert load of the whole run, from its metrics records."""
    if not records:
        return {}
    out = {"final_loss": round(records[-1]["loss"], 4)}
    curve = [(r["step"], round(r["val_loss"], 4)) for r in records if "val_loss" in r]
    if curve:
        out["val_loss"] = curve[-1][1]
    loads = [r["expert_load"] for r in records if "expert_load" in r][-10:]
    if loads:
        # Per MoE layer: each expert's share of the assignments over the last (up to) 10 steps, and their
        # coefficient of variation (std / mean; 0 when balanced, sqrt(E - 1) when one expert takes all).
        mean = torch.tensor(loads, dtype=torch.float64).mean(dim=0)  # (n_moe_layers, E)
        out["expert_load"] = [[round(v, 4) for v in row] for row in mean.tolist()]
        out["expert_load_cv"] = [round(v, 4) for v in (mean.std(dim=1, correction=0) / mean.mean(dim=1)).tolist()]
    if curve:
        out["val_curve"] = curve
    return out


def pretrain(cfg: PretrainConfig, paths: Paths, fresh: bool = False) -> dict:
    """The pretrain stage: train in this process, or launch torchrun when cfg.nproc > 1 (which never
    outlives this process: see fm.train.launch).

    fresh: set existing checkpoints aside and train from step 0, whatever they are.
    """
    if cfg.nproc == 1:
        return run(cfg, paths, fresh=fresh)
    prepare(cfg, paths, verify=True)  # config, data and layout errors as one line here, not a traceback per process
    launch_recipe("fm.recipes.pretrain", dataclasses.asdict(cfg), paths.checkpoints / "pretrain" / "launch.json",
                  paths.raw, paths.workdir, cfg.nproc, cfg.threads, fresh, extra=("--quiet", "--verified"))
    summary = json.loads((paths.models / "pretrain" / "summary.json").read_text())
    summary["outputs"] = [str(paths.models / "pretrain")]
    return summary


def describe(summary: dict) -> str:
    """One readable line about a finished run."""
    parts = [f"pretrain: {summary['steps']} steps"]
    if "continued_from_step" in summary:
        parts.append(f"(continued from step {summary['continued_from_step']} of {summary['previous_max_steps']})")
    elif summary["resumed_from_step"]:
        parts.append(f"(resumed at step {summary['resumed_from_step']})")
    for key, label in (("final_loss", "loss"), ("val_loss", "val loss")):
        if key in summary:
            parts.append(f"{label} {summary[key]}")
    if "tokens_per_s" in summary:
        parts.append(f"{summary['tokens_per_s']:,.0f} tok/s")
    if "expert_load_cv" in summary:
        parts.append("expert load cv " + "/".join(f"{v:.2f}" for v in summary["expert_load_cv"]))
    return " ".join(parts) + f" -> {summary['outputs'][0]} (summary.json)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain a decoder LM on fm token shards (run under torchrun for several processes).")
    ap.add_argument("--params", default="params.yaml", help="params file; its `pretrain` section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. pretrain.max_steps=50")
    ap.add_argument("--config", help="a resolved PretrainConfig as JSON (what the stage passes to torchrun); replaces --params/--set")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--fresh", action="store_true", help="set existing checkpoints aside and train from step 0")
    ap.add_argument("--quiet", action="store_true", help="no closing line (the stage that launched torchrun prints its own)")
    ap.add_argument("--verified", action="store_true", help="the token shards were just verified (by the stage that launched torchrun)")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive torchrun
        die_with_parent()
    if args.config:
        cfg = PretrainConfig(**json.loads(Path(args.config).read_text()))
    else:
        cfg = load_params(args.params, args.overrides).pretrain
    summary = run(cfg, Paths(args.raw, args.workdir), fresh=args.fresh, verified=args.verified)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        print(describe(summary))


if __name__ == "__main__":
    main()
