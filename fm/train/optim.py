"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW where matrices (linear and embedding weights) decay and vectors (norm gains) do not."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused multi-tensor update per group; works for plain tensors and FSDP2's DTensors.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def effective_warmup(warmup_steps: int, max_steps: int) -> int:
    """The warmup the schedule uses: warmup_steps when the run is longer, else a tenth of the run.

    A warmup as long as the run would leave no decay at all (the run would end at its peak LR), which
    is never what a short run (`max_steps=20` with the default 20 warmup steps) means: it then warms up
    over max_steps // 10 steps, the default's proportion (20 of 200), and decays over the rest.
    """
    return warmup_steps if warmup_steps < max_steps else max_steps // 10


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to max_lr over the effective warmup, then cosine decay to min_lr_ratio * max_lr at max_steps."""
    warmup_steps = effective_warmup(warmup_steps, max_steps)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    min_lr = max_lr * min_lr_ratio
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
