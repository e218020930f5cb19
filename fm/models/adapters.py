"""Parameter-efficient adapters that wrap a trained Decoder from outside: LoRA, prefix tuning, prompt tuning.

The Decoder stays a single-device module that knows nothing of adapters. Each adapter freezes the
base model (requires_grad False) and adds a few trainable tensors; train only those:

    from fm.models.adapters import apply_lora, merge_lora, PrefixTuning, PromptTuning
    model = apply_lora(load_decoder(d), targets=("wq", "wv"), rank=8, alpha=16)   # in place
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ...train as usual: logits, loss, aux = model(idx, targets)...
    plain = merge_lora(model)            # folds B @ A * alpha / r into the weights: a plain Decoder again

    tuned = PrefixTuning(model, n_prefix=16)     # learned keys/values in front of every layer's attention
    tuned = PromptTuning(model, n_virtual=16)    # learned embeddings in front of the token embeddings
    logits, loss, aux = tuned(idx, targets)      # logits (B, T, V) of the real tokens only

LoRA (Hu et al. 2021) follows peft's conventions: A (r, in) kaiming-uniform(a=sqrt(5)), B (out, r)
zeros, scaling alpha / r, dropout on the LoRA branch's input; tests/test_adapters.py checks it
against peft. Prefix tuning (Li & Liang 2021) is a pre-filled KV cache: the prefix occupies
positions 0..n_prefix-1 (real tokens start at n_prefix, as in peft, so n_prefix + T <= seq_len) and
every position attends to all of it. Prompt tuning (Lester et al. 2021) feeds
[soft prompt, tok_emb(idx)] through Decoder.forward's inputs_embeds.

Sequence packing: PrefixTuning and PromptTuning take Decoder.forward's doc_ids (B, T) too. The
prefix, or the soft prompt (given doc_ids -1, i.e. shared), is seen by every packed example, and
each example gets the positions it would get alone: it starts at n_prefix (n_virtual).
LoRA needs nothing: its model is a Decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fm.models.decoder import Decoder, KVCache

# ---------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A^T @ B^T * alpha / r, with base frozen; merge() folds the update into base.weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear); B = 0 so the start is the base
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., out), through (..., r)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (up to float rounding: W + D - D need not be W bit for bit)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, targets=("wq", "wv"), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of model and replace each nn.Linear whose name ends in one of targets by a LoRALinear.

    In place; returns model. Decoder projection names: wq, wk, wv, wo (attention), w_gate, w_up,
    w_down (dense MLP; an MoE's stacked experts are not nn.Linear and are left alone).
    """
    model.requires_grad_(False)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    tok_emb = getattr(model, "tok_emb", None)
    for name, linear in found:
        if tok_emb is not None and linear.weight is tok_emb.weight:
            raise ValueError(f"{name} is tied to tok_emb: merging LoRA into it would change the embedding too")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base weight and put the plain nn.Linear back (in place; returns model).

    A Decoder comes out with the state-dict keys of a fresh Decoder, ready for export. The base
    weights stay frozen; call model.requires_grad_(True) to train it fully afterwards.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: the lora_A / lora_B tensors (a few MB to save instead of the whole model)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


# ---------------------------------------------------------------- prefix tuning


class _PrefixCache:
    """Stands in for a KVCache during training: update() puts the prefix in front of the keys/values without
    writing in place (a KVCache's in-place writes would break backward through the prefix)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, batch_size: int):
        self.k, self.v, self.batch_size = k, v, batch_size  # (L, Hkv, P, D) each
        self.n_prefix = k.shape[2]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        assert start_pos == self.n_prefix, "a prefix cache serves one full-sequence forward"
        pk = self.k[layer].to(k.dtype).expand(self.batch_size, -1, -1, -1)  # (B, Hkv, P, D)
        pv = self.v[layer].to(v.dtype).expand(self.batch_size, -1, -1, -1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)  # (B, Hkv, P + T, D) each


class PrefixTuning(nn.Module):
    """A frozen Decoder behind n_prefix learned key/value slots per layer (keys post-RoPE, as a cache holds them)."""

    def __init__(self, model: Decoder, n_prefix: int, init_std: float | None = None,
                 init_ids: torch.Tensor | None = None):
        """init_ids (n_prefix,): start from the keys and values the frozen model computes for these tokens at
        positions 0..n_prefix-1 (Li & Liang's initialisation from real words' activations, which trains far
        faster than random slots); else normal(0, init_std or the model's init_std)."""
        super().__init__()
        cfg = model.cfg
        if not cfg.causal or cfg.attention != "dense":
            raise ValueError("prefix tuning needs a causal model with dense attention (every position sees the prefix)")
        if not 0 < n_prefix < cfg.seq_len:
            raise ValueError(f"n_prefix must be in [1, seq_len={cfg.seq_len}), got {n_prefix}")
        self.model = model.requires_grad_(False)
        self.n_prefix = n_prefix
        std = cfg.init_std if init_std is None else init_std
        shape = (cfg.n_layer, cfg.n_kv_head, n_prefix, cfg.head_dim)  # (L, Hkv, P, D)
        w = model.tok_emb.weight
        if init_ids is None:
            k = torch.randn(shape, device=w.device, dtype=w.dtype) * std
            v = torch.randn(shape, device=w.device, dtype=w.dtype) * std
        else:
            if init_ids.shape != (n_prefix,):
                raise ValueError(f"init_ids must have shape ({n_prefix},), got {tuple(init_ids.shape)}")
            cache = KVCache(cfg, 1, n_prefix, device=w.device, dtype=w.dtype)
            was_training = model.training
            with torch.no_grad():
                model.eval()(init_ids.to(w.device)[None], kv_cache=cache)  # fills cache.k, cache.v (L, 1, Hkv, P, D)
            model.train(was_training)
            k, v = cache.k[:, 0].clone(), cache.v[:, 0].clone()  # (L, Hkv, P, D) each
        self.prefix_k = nn.Parameter(k)
        self.prefix_v = nn.Parameter(v)

    def forward(self, idx, targets=None, domains=None, *, doc_ids=None):
        """As Decoder.forward on idx (B, T); the real tokens sit at positions n_prefix..n_prefix+T-1.

        doc_ids (B, T): packed examples (see Decoder.forward); each starts at position n_prefix and sees the prefix.
        """
        cache = _PrefixCache(self.prefix_k, self.prefix_v, idx.shape[0])
        return self.model(idx, targets, domains, kv_cache=cache, start_pos=self.n_prefix, doc_ids=doc_ids)

    @torch.no_grad()
    def kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KVCache holding the prefix, for generation: model(idx, kv_cache=cache, start_pos=n_prefix), then one
        token at a time at start_pos = n_prefix + T + step."""
        cache = KVCache(self.model.cfg, batch_size, max_len, device=self.prefix_k.device, dtype=self.prefix_k.dtype)
        cache.k[:, :, :, :self.n_prefix] = self.prefix_k[:, None]  # (L, B, Hkv, P, D)
        cache.v[:, :, :, :self.n_prefix] = self.prefix_v[:, None]
        return cache


# ---------------------------------------------------------------- prompt tuning


class PromptTuning(nn.Module):
    """A frozen Decoder behind n_virtual learned input embeddings; the virtual positions' logits are dropped."""

    def __init__(self, model: Decoder, n_virtual: int, init_ids: torch.Tensor | None = None):
        """init_ids (n_virtual,): start from those tokens' embeddings (Lester et al.'s best init); else random."""
        super().__init__()
        cfg = model.cfg
        if not 0 < n_virtual < cfg.seq_len:
            raise ValueError(f"n_virtual must be in [1, seq_len={cfg.seq_len}), got {n_virtual}")
        self.model = model.requires_grad_(False)
        self.n_virtual = n_virtual
        w = model.tok_emb.weight  # (V, C)
        if init_ids is None:
            prompt = torch.randn(n_virtual, cfg.d_model, device=w.device, dtype=w.dtype) * cfg.init_std
        else:
            if init_ids.shape != (n_virtual,):
                raise ValueError(f"init_ids must have shape ({n_virtual},), got {tuple(init_ids.shape)}")
            prompt = w.detach()[init_ids.to(w.device)].clone()
        self.prompt = nn.Parameter(prompt)  # (P, C)

    def forward(self, idx, targets=None, domains=None, *, doc_ids=None):
        """As Decoder.forward on idx (B, T): logits (B, T, V) of the real tokens; the loss ignores the prompt.

        doc_ids (B, T): packed examples (see Decoder.forward); the prompt is shared (doc id -1, positions
        0..n_virtual-1), each example starts at position n_virtual.
        """
        B, P = idx.shape[0], self.n_virtual
        embeds = torch.cat((self.prompt.expand(B, -1, -1), self.model.tok_emb(idx)), dim=1)  # (B, P + T, C)
        ids = torch.cat((idx.new_zeros(B, P), idx), dim=1)  # (B, P + T): id 0 for the prompt (hash-routed MoE)
        if targets is not None:
            targets = torch.cat((targets.new_full((B, P), -100), targets), dim=1)  # (B, P + T)
        if domains is not None and domains.dim() == 2:
            domains = torch.cat((domains[:, :1].expand(B, P), domains), dim=1)  # the prompt takes the first domain
        if doc_ids is not None:
            doc_ids = torch.cat((doc_ids.new_full((B, P), -1), doc_ids), dim=1)  # (B, P + T): the prompt is shared
        logits, loss, aux = self.model(ids, targets, domains, inputs_embeds=embeds, doc_ids=doc_ids)  # (B, P + T, V)
        return logits[:, P:], loss, aux  # (B, T, V)
