"""Mixture-of-experts FFN: a drop-in replacement for the decoder's SwiGLU MLP.

`n_experts` SwiGLU experts whose weights are stacked into 3D parameters, one slice per expert in
nn.Linear's (out, in) layout: w_gate, w_up (E, H, C) and w_down (E, C, H). A token goes to
expert(s) chosen by one of four routings:

    top1    Switch Transformer (Fedus et al. 2021): softmax router, top-1; the output is scaled by
            the chosen expert's router probability, which is how the router learns.
    topk    Shazeer et al. 2017 / GShard: top-k experts, gates = their probabilities renormalized to 1.
    hash    Hash layers (Roller et al. 2021): expert = a fixed, seeded universal hash of the token id;
            no router. Pure integer arithmetic, so the same token goes to the same expert in every
            process and run (Python's hash() is salted per process and is not used).
    domain  DEMix (Gururangan et al. 2021): expert = the document's domain id (`domains`); no router.

Learned routers (top1, topk) get the Switch load-balancing loss E * sum_i f_i * P_i (f_i: share of
token assignments routed to expert i, P_i: mean router probability of i; 1.0 when balanced) and a
capacity of ceil(capacity_factor * N * k / E) assignments per expert. Assignments over capacity are
dropped: they contribute zero, so the token passes through on the residual stream. First choices
take precedence over second choices, then earlier tokens over later ones. Fixed routings (hash,
domain) never drop: their balance is set by the data, not learned.

Capacity applies in training only (`self.training`). It depends on N, the tokens of the whole
batch, so at evaluation and generation it would make a row's output depend on the other rows and
KV-cached decoding (N = B new tokens) differ from a full recompute. In eval mode every assignment
goes to its expert, so the output of a token depends on that token alone (capacity exists for the
fixed per-expert buffers of batched training, Switch sec. 2.2; here it is only a training regularizer).

Dispatch is sorted, not looped per token: assignments are argsorted by expert, tokens gathered
once into expert-contiguous rows, each expert runs one batched SwiGLU on its slice (a Python loop
over experts), and results are scattered back with one index_add.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("top1", "topk", "hash", "domain")
_HASH_PRIME = 2_147_483_647  # 2**31 - 1: (a * id + b) stays below 2**62 for any id < 2**31, so int64 never overflows


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit integer from x (Steele et al. 2014), in plain Python ints: same everywhere."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def hash_experts(token_ids: torch.Tensor, n_experts: int, seed: int = 0) -> torch.Tensor:
    """Expert of each token id: ((a * id + b) mod p) mod E with a, b fixed by `seed` (universal hashing)."""
    a = 1 + _splitmix64(2 * seed) % (_HASH_PRIME - 1)
    b = _splitmix64(2 * seed + 1) % _HASH_PRIME
    return (token_ids.long() * a + b) % _HASH_PRIME % n_experts


class MoE(nn.Module):
    """Routed SwiGLU experts. forward(x (B, T, C), token_ids (B, T), domains (B,) or (B, T)) -> (out, stats)."""

    def __init__(self, d_model: int, ffn_hidden: int, n_experts: int, routing: str = "topk", top_k: int = 2,
                 capacity_factor: float = 1.25, hash_seed: int = 0):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown MoE routing {routing!r}; expected one of {ROUTINGS}")
        if routing == "topk" and not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.routing, self.hash_seed = n_experts, routing, hash_seed
        self.top_k = top_k if routing == "topk" else 1
        self.capacity_factor = capacity_factor if routing in ("top1", "topk") else 0.0  # <= 0: no capacity limit
        self.w_gate = nn.Parameter(torch.empty(n_experts, ffn_hidden, d_model))  # (E, H, C)
        self.w_up = nn.Parameter(torch.empty(n_experts, ffn_hidden, d_model))  # (E, H, C)
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, ffn_hidden))  # (E, C, H)
        self.router = nn.Linear(d_model, n_experts, bias=False) if routing in ("top1", "topk") else None
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) weights; w_down (a residual projection) gets out_std (default std)."""
        for w in (self.w_gate, self.w_up):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.w_down, std=std if out_std is None else out_std)
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=std)

    @torch.no_grad()
    def load_dense(self, mlp: nn.Module) -> None:
        """Copy a dense MLP's w_gate/w_up/w_down into every expert (sparse upcycling); the router is unchanged."""
        self.w_gate.copy_(mlp.w_gate.weight.expand_as(self.w_gate))
        self.w_up.copy_(mlp.w_up.weight.expand_as(self.w_up))
        self.w_down.copy_(mlp.w_down.weight.expand_as(self.w_down))

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None, domains: torch.Tensor | None):
        """Expert choices (N, k) int64, their gates (N, k) or None (gate 1), router probs (N, E) or None."""
        N = x.shape[0]
        if self.routing == "hash":
            if token_ids is None:
                raise ValueError("hash routing needs token_ids")
            return hash_experts(token_ids.reshape(N, 1), self.n_experts, self.hash_seed), None, None
        if self.routing == "domain":
            if domains is None:
                raise ValueError("domain routing needs domains: (B,) or (B, T) domain ids")
            B = domains.shape[0]
            expert = domains.long().reshape(B, -1).expand(B, N // B).reshape(N, 1)  # (N, 1)
            if expert.numel() and not 0 <= int(expert.min()) <= int(expert.max()) < self.n_experts:
                raise ValueError(f"domain ids must be in [0, {self.n_experts}), one expert per domain")
            return expert, None, None
        with torch.autocast(x.device.type, enabled=False):  # route in fp32 (Switch: bf16 routing is unstable)
            probs = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)  # (N, E)
        gate, expert = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
        if self.routing == "topk":
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return expert, gate, probs

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, domains: torch.Tensor | None = None):
        """Returns out (B, T, C) and stats: aux_loss (scalar), load (E,) share of assignments, dropped (scalar).

        Only a training forward drops over capacity; in eval dropped is 0 and every assignment reaches its expert.
        """
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        x = x.reshape(B * T, C)  # (N, C)
        N = x.shape[0]
        expert, gate, probs = self.route(x, token_ids, domains)  # (N, k), (N, k) | None, (N, E) | None

        # Choice-major order: every token's first choice ranks before any second choice for capacity.
        flat_expert = expert.t().reshape(-1)  # (k*N,)
        counts = torch.bincount(flat_expert, minlength=E)  # (E,) assignments per expert
        load = counts.float() / max(flat_expert.numel(), 1)  # (E,) f_i
        aux_loss = E * (load * probs.mean(dim=0)).sum() if probs is not None else x.new_zeros((), dtype=torch.float32)

        sorted_expert, order = flat_expert.sort(stable=True)  # (k*N,) grouped by expert, priority order within
        if self.capacity_factor > 0 and self.training:  # eval: no drops, so a row's output is batch-independent
            capacity = math.ceil(self.capacity_factor * N * k / E)
            first = counts.cumsum(0) - counts  # (E,) where each expert's run starts in `order`
            rank = torch.arange(order.numel(), device=x.device) - first[sorted_expert]  # (k*N,) rank within expert
            order = order[rank < capacity]  # (M,) kept assignments
            counts = counts.clamp(max=capacity)
        dropped = flat_expert.numel() - order.numel()

        token = order % N  # (M,) token of each kept assignment
        xs = x[token]  # (M, C) expert-contiguous rows
        ys = []
        for e, xe in enumerate(xs.split(counts.tolist())):  # xe: (n_e, C)
            h = F.silu(F.linear(xe, self.w_gate[e])) * F.linear(xe, self.w_up[e])  # (n_e, H)
            ys.append(F.linear(h, self.w_down[e]))  # (n_e, C)
        y = torch.cat(ys)  # (M, C)
        if gate is not None:
            y = y * gate.t().reshape(-1)[order, None]  # (M, C) scaled by each assignment's gate
        out = x.new_zeros(N, C).index_add_(0, token, y.to(x.dtype))  # (N, C); dropped tokens stay 0
        stats = {"aux_loss": aux_loss, "load": load, "dropped": torch.tensor(dropped)}
        return out.view(B, T, C), stats
