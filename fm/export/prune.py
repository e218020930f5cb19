"""Structured pruning of a Decoder's MLP channels by an activation-weighted importance, and a KD recovery fine-tune.

    from fm.export.prune import evaluate, prune_mlp, recover
    pruned, info = prune_mlp(student, keep_fraction=0.75, batches=[calib_ids], multiple_of=16)   # ids (B, T)
    losses = recover(pruned, student, train_batches=[(x, y), ...], steps=50, lr=1e-4)   # pure KD at T=1
    report = evaluate(pruned, heldout_windows, reference=student)   # perplexity, top-1 agreement, KL

What is removed: hidden channels of every dense SwiGLU MLP, y = w_down(silu(w_gate x) * w_up x). Channel
c is row c of w_gate and w_up and column c of w_down; dropping it leaves a smaller dense MLP, so the
pruned model is an ordinary Decoder with `ffn_hidden` smaller (dataclasses.replace of the config) that
export_model, load_pretrained and fm.export.onnx take unchanged. Every layer keeps the same number of
channels (ModelConfig has one ffn_hidden), rounded to a multiple of `multiple_of` (matmul kernels
prefer widths that are multiples of 8-16; the int8 ones of 16 or more).

Importance of channel c in a layer, from calibration batches (Wanda's |W| * ||X||, Sun et al. 2023,
taken over the group of weights a channel owns, as FLAP / LLM-Pruner do for structured pruning):

    score[c] = sqrt(mean over tokens of h_c^2) * ||w_down[:, c]||_2,   h = silu(w_gate x) * w_up x

Why this one: removing a set S of channels changes the MLP output of a token by -sum_{c in S} h_c
w_down[:, c]; leaving out the correlations between channels, the mean squared norm of that change
is sum_{c in S} score[c]^2. Keeping the top scores therefore removes the least estimated output
energy, per layer. A weight-only score (norms of w_gate/w_up/w_down) cannot see that a channel is
rarely active on real data, and the activation alone cannot see that w_down maps it to almost
nothing; a channel with w_down[:, c] = 0 scores exactly 0 and is pruned first, at no cost.
info["removed_score_share"] reports, per layer, the share of sum(score^2) that was removed.

Not done: attention heads. A head is head_dim = d_model // n_head columns of wq/wk/wv and rows of
wo, and ModelConfig derives head_dim from d_model and n_head, so fewer heads of the same size is not
expressible without changing the Decoder. MoE layers (stacked experts, routing) are refused.

Recovery (`recover`) is a short knowledge-distillation fine-tune (fm.train.distill.distill_loss) of
the pruned model towards the unpruned one: AdamW, warmup + cosine LR (fm.train.optim.lr_at), a fixed
seed, the teacher in eval mode under no_grad. Its defaults are pure KD (alpha 1) at temperature 1: the aim
is to get the unpruned model's distribution back. A CE share (alpha < 1) keeps training the model on the
data instead: on the distilled student at keep 0.5 (40 steps of 4 x 128 tokens), alpha 0.5 took held-out
perplexity below the unpruned model's (315 vs 380) but top-1 agreement with it down to 0.69, while alpha 1
at lr 1e-4 took agreement from 0.91 to 0.96. lr 3e-4 and 1e-3 did worse than 1e-4 (the pruned model
starts close to its teacher; at 1e-3 the held-out KL to it even grew).
The quality and speed a pruning costs are measured (`evaluate` here; latency in bench/prune_bench.py),
not assumed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from fm.models.decoder import MLP, Decoder
from fm.train.distill import distill_loss
from fm.train.optim import build_optimizer, lr_at

SCORE = "sqrt(mean_tokens h_c^2) * ||w_down[:, c]||_2, h = silu(w_gate x) * w_up x"


def check_prunable(model) -> None:
    """ValueError unless model is a float32 Decoder whose every MLP is a dense SwiGLU MLP (no MoE)."""
    if not isinstance(model, Decoder):
        raise ValueError(f"MLP pruning needs an fm Decoder, got {type(model).__name__} (merge LoRA adapters first)")
    if model.cfg.moe_layers:
        raise ValueError(f"MLP pruning of MoE layers {list(model.cfg.moe_layers)} is not supported (stacked experts "
                         f"and routing); only dense Decoders prune")
    if not all(isinstance(block.mlp, MLP) for block in model.layers):
        raise ValueError("MLP pruning needs a dense SwiGLU MLP in every layer")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"MLP pruning takes a float32 model, got {sorted(map(str, dtypes))}: call model.float() first")


def kept_width(ffn_hidden: int, keep_fraction: float, multiple_of: int) -> int:
    """Channels every layer keeps: keep_fraction * ffn_hidden rounded to the nearest multiple of multiple_of,
    at least multiple_of, at most ffn_hidden. keep_fraction 1 keeps all (even when ffn_hidden is not a multiple)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if not (isinstance(multiple_of, int) and multiple_of >= 1):
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    if keep_fraction == 1.0:
        return ffn_hidden
    width = min(ffn_hidden, max(multiple_of, multiple_of * round(keep_fraction * ffn_hidden / multiple_of)))
    if width == ffn_hidden:
        raise ValueError(f"keep_fraction {keep_fraction} of ffn_hidden {ffn_hidden} rounds to all channels at "
                         f"multiple_of {multiple_of}: nothing would be pruned; lower keep_fraction or multiple_of")
    return width


@torch.no_grad()
def mlp_importance(model: Decoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(n_layer, ffn_hidden) float32 importance of every MLP channel (the module docstring's score) over the
    tokens of batches, each a (B, T) int64 tensor of token ids. Runs the model in eval mode; its mode is restored."""
    check_prunable(model)
    cfg, device = model.cfg, model.tok_emb.weight.device
    sum_sq = torch.zeros(cfg.n_layer, cfg.ffn_hidden, dtype=torch.float64, device=device)  # sum over tokens of h_c^2

    def accumulate(layer: int):
        def hook(module, inputs):
            h = inputs[0]  # (B, T, F): silu(w_gate x) * w_up x, what w_down multiplies
            sum_sq[layer] += h.double().square().flatten(0, -2).sum(dim=0)
        return hook

    handles = [block.mlp.w_down.register_forward_pre_hook(accumulate(i)) for i, block in enumerate(model.layers)]
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for ids in batches:
            if not (isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point()):
                raise ValueError(f"calibration batches must be (B, T) integer token ids, got "
                                 f"{getattr(ids, 'shape', type(ids).__name__)}")
            model(ids.to(device))
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("mlp_importance needs at least one calibration token")
    rms = (sum_sq / tokens).sqrt()  # (L, F)
    column_norms = torch.stack([block.mlp.w_down.weight.double().norm(dim=0) for block in model.layers])  # (L, F)
    return (rms * column_norms).float()


def slice_mlp(model: Decoder, channels: Sequence[torch.Tensor]) -> Decoder:
    """A new Decoder with only `channels[i]` (int indices, the same count in every layer) of layer i's MLP,
    in the order given; everything else is copied. The model is left as it was (and so is the global RNG)."""
    check_prunable(model)
    cfg = model.cfg
    if len(channels) != cfg.n_layer:
        raise ValueError(f"channels: one index tensor per layer ({cfg.n_layer}), got {len(channels)}")
    channels = [torch.as_tensor(c, dtype=torch.int64).cpu() for c in channels]
    width = len(channels[0])
    for i, c in enumerate(channels):
        if c.ndim != 1 or len(c) != width or len(c) == 0:
            raise ValueError(f"channels: every layer keeps the same positive count ({width}), layer {i} has {tuple(c.shape)}")
        if len(c.unique()) != len(c) or int(c.min()) < 0 or int(c.max()) >= cfg.ffn_hidden:
            raise ValueError(f"channels of layer {i} must be distinct indices in [0, {cfg.ffn_hidden})")
    state = model.state_dict()
    for i, c in enumerate(channels):
        c = c.to(model.tok_emb.weight.device)
        for name in ("w_gate", "w_up"):  # (F, C): rows are channels
            key = f"layers.{i}.mlp.{name}.weight"
            state[key] = state[key][c]
        key = f"layers.{i}.mlp.w_down.weight"  # (C, F): columns are channels
        state[key] = state[key][:, c]
    with torch.random.fork_rng(devices=[]):  # Decoder() draws its init; the weights are overwritten anyway
        pruned = Decoder(dataclasses.replace(cfg, ffn_hidden=width))
    pruned.to(model.tok_emb.weight.device).load_state_dict(state)  # strict: every tensor accounted for
    return pruned.train(model.training)


def prune_mlp(model: Decoder, keep_fraction: float, batches: Iterable[torch.Tensor],
              multiple_of: int = 16) -> tuple[Decoder, dict]:
    """(pruned copy of model, info): every layer keeps its kept_width(...) most important MLP channels (in their
    original order) by mlp_importance over the calibration batches ((B, T) token ids). The model is unchanged."""
    check_prunable(model)
    cfg = model.cfg
    width = kept_width(cfg.ffn_hidden, keep_fraction, multiple_of)
    scores = mlp_importance(model, batches)  # (L, F)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: the lower index first
    channels = [row[:width].sort().values for row in order]
    pruned = slice_mlp(model, channels)
    energy = scores.double().square()  # (L, F): the estimated output energy of each channel
    kept_energy = torch.stack([energy[i, c].sum() for i, c in enumerate(channels)])  # (L,)
    total_energy = energy.sum(dim=1).clamp(min=1e-300)
    info = {
        "method": "mlp_channels",
        "score": SCORE,
        "keep_fraction": keep_fraction,
        "multiple_of": multiple_of,
        "ffn_hidden": {"before": cfg.ffn_hidden, "after": width},
        "kept_fraction": round(width / cfg.ffn_hidden, 6),
        "params": {"before": cfg.num_params(), "after": pruned.cfg.num_params()},
        "removed_score_share": [round(float(1 - k / t), 6) for k, t in zip(kept_energy, total_energy)],
    }
    return pruned, info


def recover(pruned: Decoder, teacher: torch.nn.Module, train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
            steps: int, lr: float = 1e-4, temperature: float = 1.0, alpha: float = 1.0, *, seed: int = 0,
            weight_decay: float = 0.0, grad_clip: float = 1.0) -> list[float]:
    """Fine-tune pruned in place towards teacher (the unpruned model) with distill_loss for `steps` steps,
    cycling over train_batches ((x, y) pairs of (B, T) token ids and next-token targets, -100 ignored).

    AdamW (betas 0.9, 0.95), LR warmup over steps // 10 then cosine to lr / 10, gradients clipped at
    grad_clip. The teacher runs in eval mode under no_grad (its parameters are never touched); both
    models' modes and the global RNG are restored afterwards. Returns the loss of every step.
    """
    check_prunable(pruned)
    if teacher is pruned:
        raise ValueError("recover: the teacher must be the unpruned model, not the pruned one itself")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"recover: steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"recover: lr must be positive, got {lr}")
    train_batches = list(train_batches)
    if not train_batches:
        raise ValueError("recover needs at least one training batch")
    device = pruned.tok_emb.weight.device
    optimizer = build_optimizer(pruned, lr, weight_decay, (0.9, 0.95))
    modes = pruned.training, teacher.training
    losses = []
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # dropout, if the config has any
        pruned.train()
        teacher.eval()
        try:
            for step in range(steps):
                x, y = (t.to(device) for t in train_batches[step % len(train_batches)])  # (B, T) each
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr, steps // 10, steps, 0.1)
                with torch.no_grad():
                    teacher_logits = teacher(x)[0]  # (B, T, V)
                loss = distill_loss(pruned(x)[0], teacher_logits, y, temperature, alpha).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(pruned.parameters(), grad_clip)
                optimizer.step()
                losses.append(loss.item())
        finally:
            pruned.train(modes[0])
            teacher.train(modes[1])
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, reference: torch.nn.Module | None = None,
             batch_size: int = 16) -> dict:
    """Held-out figures of model on windows (N, L) token ids, each row predicting its own next tokens:
    perplexity = exp(mean cross-entropy of logits[:, :-1] against windows[:, 1:]) (as the export stage
    computes it), and with a reference model also top1_agreement (share of all N * L positions where
    the argmax agrees) and kl_to_reference (mean KL(reference || model), nats per position). Eval mode;
    modes restored."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, L >= 2) token ids, got {tuple(windows.shape)}")
    models = [model] + ([reference] if reference is not None else [])
    modes = [m.training for m in models]
    nll, agree, kl = 0.0, 0, 0.0
    try:
        for m in models:
            m.eval()
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size]  # (b, L)
            logits = model(ids)[0].float()  # (b, L, V)
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            if reference is not None:
                ref = reference(ids)[0].float()  # (b, L, V)
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                kl += F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    N, L = windows.shape
    out = {"perplexity": math.exp(nll / (N * (L - 1)))}
    if reference is not None:
        out["top1_agreement"] = agree / (N * L)
        out["kl_to_reference"] = kl / (N * L)
    return out
