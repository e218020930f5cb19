"""The training loop: one visible function, `train`, that recipes call with the pieces they built.

Each step: set the learning rate from the schedule, run `grad_accum` micro-batches
(forward under autocast where enabled, backward; DDP syncs only on the last one), clip the
gradient norm, step AdamW, log loss / lr / tokens per second / MFU (and MoE expert load),
now and then evaluate on held-out windows and write a checkpoint. No callbacks, no trainer
class: what happens in a step is what is written here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fm.train.optim import lr_at
from fm.train.parallel import Dist, Pipeline, clip_grad_norm_, mean_loss


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s on this device and dtype: the denominator of MFU when no spec peak is given."""
    n = 4096 if device.type == "cuda" else 1024
    # Its own generator: measuring (before training, or not at all) leaves the global RNG, which a resume restores, alone.
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast when asked for; fp32 needs no context."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, batches: int, device: torch.device, dtype: str,
             pipeline: Pipeline | None = None, d: Dist | None = None) -> float:
    """Mean loss over the same `batches` held-out batches every time (the loader is rewound)."""
    state = loader.state_dict()
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        args, kwargs = _batch(loader, device)
        with autocast_context(device, dtype):
            if pipeline is not None:  # forward through the stages; the loss lives on the last one
                total += pipeline.eval_loss(*args)
                continue
            _, loss, aux = model(*args, **kwargs)
        total += aux.get("ce_loss", loss).float()
    model.train()
    loader.load_state_dict(state)
    return mean_loss(total / batches, d or Dist()).item()


def progress_bar():
    """A live bar on stderr when it is a terminal; else nothing (train prints a line every log_every steps)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)


def _batch(loader, device: torch.device) -> tuple[tuple, dict]:
    """The model's (args, kwargs) for the loader's next batch, on device.

    A language-model loader gives (x, y, domains): model(x, y, domains=domains); a loader of packed
    examples (fm.data.packing) adds doc_ids (B, T), so that attention and positions stay within each
    example. Any other model's loader gives a dict of keyword arguments (CLIP: images, ids, lengths).
    """
    batch = loader.next_batch()
    if isinstance(batch, dict):
        return (), {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    x, y, domains, *rest = (t.to(device, non_blocking=True) for t in batch)
    return (x, y), {"domains": domains, **({"doc_ids": rest[0]} if rest else {})}


def _moe_load(record: dict) -> str:
    """' moe load 0.18-0.33 (even 0.25)': the smallest and largest expert share over the MoE layers this step."""
    loads = record.get("expert_load")
    if not loads:
        return ""
    shares = [v for row in loads for v in row]
    return f" moe load {min(shares):.2f}-{max(shares):.2f} (even {1 / len(loads[0]):.2f})"


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    cfg,
    d: Dist,
    *,
    val_loader=None,
    start_step: int = 0,
    checkpoint_fn: Callable[[int], None] | None = None,
    metrics_path: Path | None = None,
    flops_per_token: int = 0,
    peak_flops: float = 0.0,
    progress=None,
    pipeline: Pipeline | None = None,
    name: str = "pretrain",
) -> list[dict]:
    """Train from start_step to cfg.max_steps; return one metrics record per step.

    cfg needs: max_steps, lr, warmup_steps, min_lr_ratio, grad_accum, grad_clip, batch_size,
    seq_len, dtype, eval_every, eval_batches, ckpt_every, log_every.
    pipeline: with pipeline parallelism, runs each micro-batch's forward and backward through the stages.
    name: the run's name on the progress bar.
    The loss is what model(x, y, domains=..., [doc_ids=...]) returns; its aux["ce_loss"], when there is one,
    is what the loop logs as "loss" (the data term, without MoE balancing or distillation terms).
    """
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.dp_size  # tp and pp ranks share a batch
    history: list[dict] = []
    metrics = open(metrics_path, "a") if (metrics_path and d.is_main) else None
    task = progress.add_task(name, total=cfg.max_steps, completed=start_step) if progress else None
    # A log file or CI has no live progress bar: print a line every log_every steps instead.
    log_lines = d.is_main and cfg.log_every > 0 and (progress is None or not progress.console.is_terminal)
    model.train()
    try:
        for step in range(start_step, cfg.max_steps):
            start = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), device=d.device)
            aux_last = {}
            for micro in range(cfg.grad_accum):
                args, kwargs = _batch(loader, d.device)  # (x (B, T), y (B, T)), {domains, [doc_ids]}; or {...}
                if pipeline is not None:
                    # Pipeline parallel: the schedule splits the batch into microbatches and runs this stage's
                    # forward and backward for each, passing activations and gradients to the neighbouring stages.
                    with autocast_context(d.device, cfg.dtype):
                        loss_sum += pipeline.step(*args)
                    continue
                last = micro == cfg.grad_accum - 1
                # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
                sync = nullcontext() if (last or not is_ddp) else model.no_sync()
                with sync:
                    with autocast_context(d.device, cfg.dtype):
                        _, loss, aux_last = model(*args, **kwargs)
                    (loss / cfg.grad_accum).backward()
                loss_sum += aux_last.get("ce_loss", loss).detach().float()

            grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip, d)  # over all stages and shards
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value = mean_loss(loss_sum / cfg.grad_accum, d).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step + 1}: lower train.lr or check the data")
            seconds = time.perf_counter() - start
            tokens_per_s = tokens_per_step / seconds
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": round(tokens_per_s, 1), "step_s": round(seconds, 4)}
            if peak_flops and flops_per_token:
                record["mfu"] = round(flops_per_token * tokens_per_s / (peak_flops * d.world_size), 4)
            if "expert_load" in aux_last:
                record["expert_load"] = [[round(v, 4) for v in row] for row in aux_last["expert_load"].tolist()]
            if val_loader is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
                record["val_loss"] = evaluate(model, val_loader, cfg.eval_batches, d.device, cfg.dtype, pipeline, d)
            history.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            shown = f"loss {loss_value:.3f}" + (f" val {record['val_loss']:.3f}" if "val_loss" in record else "")
            if progress:
                progress.update(task, advance=1, description=f"{name} {shown} {tokens_per_s:,.0f} tok/s")
            if log_lines and ((step + 1) % cfg.log_every == 0 or "val_loss" in record or step + 1 == cfg.max_steps):
                mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
                print(f"step {step + 1}/{cfg.max_steps} {shown} lr {lr:.2e} {tokens_per_s:,.0f} tok/s{mfu}{_moe_load(record)}",
                      file=sys.stderr, flush=True)
            if checkpoint_fn and cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps):
                checkpoint_fn(step + 1)
    finally:
        if metrics:
            metrics.close()
    return history
