"""Decoder-only transformer LM (Llama-style): RoPE, RMSNorm, SwiGLU, SDPA, optional MoE and sparse attention.

One file, one config: `ModelConfig` (frozen; `to_dict`/`from_dict` round-trip a checkpoint's
config.json) and `Decoder`, a single-device nn.Module that knows nothing of ranks, FSDP or LoRA.

    from fm.models.decoder import Decoder, PRESETS
    model = Decoder(PRESETS["small"])
    logits, loss, aux = model(idx, targets)              # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=32, temperature=0)   # greedy, KV-cached
    logits, loss, aux = model(idx, targets, doc_ids=doc_ids)       # packed examples: see Decoder.forward

Module names a parallelize() plan refers to (one Block per entry of `model.layers`):
    layers[i].attn.wq / wk / wv   column-parallel  (d_model -> heads * head_dim), separate so GQA shards cleanly
    layers[i].attn.wo             row-parallel     (heads * head_dim -> d_model)
    layers[i].mlp.w_gate / w_up   column-parallel  (d_model -> ffn_hidden)        dense MLP layers
    layers[i].mlp.w_down          row-parallel     (ffn_hidden -> d_model)
    layers[i].attn_norm, mlp_norm, norm: RMSNorm; tok_emb: Embedding; lm_head: Linear (tied to tok_emb by default)
An MoE layer's `mlp` is an `fm.models.moe.MoE` (stacked expert weights, see there).
The q/k head layout is the Hugging Face Llama one (RoPE rotates halves), so the weights export to
LlamaForCausalLM without permutation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fm.models.attention import PATTERNS, build_mask
from fm.models.moe import ROUTINGS, MoE


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Decoder. Defaults are the `small` preset.

    n_kv_head, ffn_hidden and moe_layers are resolved at construction and stored resolved (so a
    checkpoint's config.json is explicit); dataclasses.replace(cfg, d_model=...) therefore keeps the
    old ffn_hidden: pass the new one too (or None to derive it again).
    """

    vocab_size: int = 8192
    seq_len: int = 256  # maximum positions (RoPE table, sparse-attention mask, KV cache)
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: n_head (multi-head); fewer: grouped-query attention
    d_model: int = 384
    ffn_hidden: int | None = None  # None: SwiGLU's 8/3 * d_model rounded up to a multiple of multiple_of
    multiple_of: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    causal: bool = True  # False: bidirectional encoder (e.g. for MLM); no generate, dense attention only
    # mixture of experts: moe_layers holds the indices of the layers whose MLP is an MoE. It also
    # accepts "none", "all" or "every_K" (layers K-1, 2K-1, ...: every_2 = every other layer,
    # as in Switch/GShard), normalized to the tuple of indices.
    moe_layers: tuple = ()
    n_experts: int = 8
    moe_top_k: int = 2  # experts per token for "topk"; top1, hash and domain use 1
    moe_routing: str = "topk"  # "top1" | "topk" | "hash" | "domain" (see fm/models/moe.py)
    capacity_factor: float = 1.25  # learned routers: expert capacity = ceil(cf * tokens * k / E); <= 0: unlimited
    aux_loss_weight: float = 0.01  # loss = cross-entropy + aux_loss_weight * mean over MoE layers of the Switch aux loss
    n_domains: int = 0  # domain routing: one expert per domain, so n_experts == n_domains
    # attention pattern (fm/models/attention.py), always causal
    attention: str = "dense"  # "dense" | "local" | "strided" | "fixed"
    attn_window: int = 128  # local, strided: attend to the previous attn_window tokens, self included
    attn_stride: int = 128  # strided: also every attn_stride-th token back; fixed: block size
    attn_summary: int = 8  # fixed: the last attn_summary positions of every block are visible to later blocks

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.n_kv_head is None:
            put("n_kv_head", self.n_head)
        if self.ffn_hidden is None:
            put("ffn_hidden", self.multiple_of * math.ceil(8 * self.d_model / 3 / self.multiple_of))
        put("moe_layers", self._parse_moe_layers(self.moe_layers))
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden",
                     "multiple_of", "n_experts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"model.d_model ({self.d_model}) must split into n_head ({self.n_head}) heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.moe_routing not in ROUTINGS:
            raise ValueError(f"model.moe_routing must be one of {ROUTINGS}, got {self.moe_routing!r}")
        if self.moe_layers and self.moe_routing == "topk" and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError(f"model.moe_top_k must be in [1, n_experts={self.n_experts}], got {self.moe_top_k}")
        if self.moe_layers and self.moe_routing == "domain" and self.n_domains != self.n_experts:
            raise ValueError(f"domain routing needs one expert per domain: "
                             f"n_experts ({self.n_experts}) != n_domains ({self.n_domains})")
        if self.attention not in PATTERNS:
            raise ValueError(f"model.attention must be one of {PATTERNS}, got {self.attention!r}")
        if self.attention != "dense":
            if not self.causal:
                raise ValueError("sparse attention patterns are causal; use attention='dense' with causal=False")
            build_mask(self.attention, 1, self.attn_window, self.attn_stride, self.attn_summary)  # validates the sizes

    def _parse_moe_layers(self, spec) -> tuple:
        if isinstance(spec, str):
            if spec == "none":
                return ()
            if spec == "all":
                return tuple(range(self.n_layer))
            if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) > 0:
                k = int(spec[6:])
                return tuple(range(k - 1, self.n_layer, k))
            raise ValueError(f"model.moe_layers must be 'none', 'all', 'every_K' or layer indices, got {spec!r}")
        layers = tuple(sorted(set(int(i) for i in spec)))
        if any(not 0 <= i < self.n_layer for i in layers):
            raise ValueError(f"model.moe_layers {layers} out of range for n_layer={self.n_layer}")
        return layers

    def to_dict(self) -> dict:
        """JSON-safe dict (moe_layers as a list) that from_dict turns back into an equal config."""
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count from the config alone (equals sum of numel over Decoder(cfg).parameters()).

        non_embedding: leave out the vocabulary matrices (token embedding, and the LM head when untied).
        active: count an MoE layer's experts as the k a token uses (top_k for topk, 1 otherwise).
        """
        d, h, hd = self.d_model, self.ffn_hidden, self.head_dim
        attn = d * hd * (self.n_head + 2 * self.n_kv_head) + self.n_head * hd * d  # wq, wk, wv, wo
        mlp = 3 * d * h  # w_gate, w_up, w_down
        n_moe = len(self.moe_layers)
        k = self.moe_top_k if self.moe_routing == "topk" else 1
        router = d * self.n_experts if self.moe_routing in ("top1", "topk") else 0
        moe = (k if active else self.n_experts) * mlp + router
        blocks = self.n_layer * (attn + 2 * d) + (self.n_layer - n_moe) * mlp + n_moe * moe  # + 2 RMSNorms each
        vocab = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return blocks + d + (0 if non_embedding else vocab)  # + final RMSNorm

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at context seq_len: 6 * N + 12 * n_layer * d_model * T.

        The PaLM (Chowdhery et al. 2022, app. B) / nanoGPT MFU convention. N counts every weight a
        token multiplies by: the non-embedding active parameters plus the LM head (vocab_size *
        d_model, tied or not; the input embedding is a lookup and free). For a tied dense model N is
        num_params(). 12·L·d·T is QK^T and AV, counted as full (non-causal, dense) attention even for
        causal or sparse patterns, as the convention does.
        """
        T = self.seq_len if seq_len is None else seq_len
        n = self.num_params(non_embedding=True, active=True) + self.vocab_size * self.d_model
        return 6 * n + 12 * self.n_layer * self.d_model * T


PRESETS = {
    # ~1.0M parameters, for tests and smoke runs
    "tiny": ModelConfig(vocab_size=8192, seq_len=128, n_layer=2, n_head=4, d_model=96),
    # 13.8M: the benchmark size (6 x 384, 6 heads, the vocab of the tokenize stage)
    "small": ModelConfig(vocab_size=8192, seq_len=256, n_layer=6, n_head=6, d_model=384),
    # GPT-2 small / medium shapes with GPT-2's vocab padded to 64 (~124M / ~355M); a recipe replaces
    # vocab_size with its tokenizer's.
    "base": ModelConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "large": ModelConfig(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
}


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (seq_len, head_dim) for apply_rope: [cos, cos] and [-sin, sin] of the angles pos * theta^(-2i/D)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (S, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()  # (S, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of each head of x (B, T, H, D): (x1 cos - x2 sin, x2 cos + x1 sin).

    cos, sin (T, D) come from rope_tables with the sign folded in, so this is 2 multiplies, an add
    and one cat (the fewest kernels in eager mode; the Hugging Face Llama layout). They may also be
    (B, T, D), rows of those tables gathered per row (packed sequences, whose positions restart).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # (T, 1, D) or (B, T, 1, D)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin  # (B, T, H, D)


class KVCache:
    """Preallocated keys and values of every layer: k, v (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at positions start_pos.. of `layer`; return all keys/values so far."""
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H_kv, end, D) each


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with RoPE through F.scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_head, self.n_kv_head, self.head_dim = layer_id, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x, rope, attn_mask=None, is_causal=True, kv_cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), *rope).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), *rope).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)  # (B, Hkv, S, D), S = start_pos + T
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless under autocast
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU feed-forward: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, d_model: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_up = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate.weight, std=std)
        nn.init.normal_(self.w_up.weight, std=std)
        nn.init.normal_(self.w_down.weight, std=out_std)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is an MLP or an MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if layer_id in cfg.moe_layers:
            self.mlp = MoE(cfg.d_model, cfg.ffn_hidden, cfg.n_experts, cfg.moe_routing, cfg.moe_top_k, cfg.capacity_factor)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope, attn_mask=None, is_causal=True, kv_cache=None, start_pos=0, idx=None, domains=None):
        """x (B, T, C) -> (x (B, T, C), MoE stats dict or None)."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, attn_mask, is_causal, kv_cache, start_pos))
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(self.mlp_norm(x), idx, domains)
        else:
            h, stats = self.mlp(self.mlp_norm(x)), None
        return x + self.drop(h), stats


def _fill_tied_head(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a tied Decoder: lm_head.weight is tok_emb.weight when it is left out."""
    if prefix + "lm_head.weight" not in state_dict and prefix + "tok_emb.weight" in state_dict:
        state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "tok_emb.weight"]


class Decoder(nn.Module):
    """Token embedding -> n_layer Blocks -> RMSNorm -> LM head (tied to the embedding by default)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
            # A saved tied model stores the shared matrix once (as tok_emb.weight, as safetensors and
            # Hugging Face do): a state dict without lm_head.weight is complete, even for strict loading.
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        # Derived from the config, so not saved: rebuilt by init_weights (also after a meta-device init).
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, cfg.head_dim), persistent=False)
        if cfg.attention != "dense":
            self.register_buffer("sparse_mask", torch.empty(cfg.seq_len, cfg.seq_len, dtype=torch.bool), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: normal(0, init_std), residual projections (wo, w_down) scaled by 1/sqrt(2 n_layer)."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if cfg.attention != "dense":
            mask = build_mask(cfg.attention, cfg.seq_len, cfg.attn_window, cfg.attn_stride, cfg.attn_summary)
            self.sparse_mask.copy_(mask)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
            block.attn.init_weights(std, out_std)
            block.mlp.init_weights(std, out_std)
        self.norm.reset_parameters()

    def _attention_mask(self, T: int, start_pos: int, cached: bool):
        """(attn_mask, is_causal) for queries at start_pos..start_pos+T over the keys SDPA will see."""
        k_start, end = (0 if cached else start_pos), start_pos + T  # keys cover k_start..end-1
        if not self.cfg.causal:
            return None, False
        if self.cfg.attention != "dense":
            return self.sparse_mask[start_pos:end, k_start:end], False  # (T, S) slice of the full-length mask
        if end - k_start == T:  # queries and keys aligned: SDPA's own causal mask
            return None, T > 1
        if T == 1:  # one new token sees the whole cache
            return None, False
        return build_mask("dense", end)[start_pos:end].to(self.rope_cos.device), False  # (T, S) chunked prefill

    def _packed_rope_and_mask(self, doc_ids: torch.Tensor, start_pos: int, n_front: int):
        """Per-row RoPE tables (B, T, D) and attention mask (B, 1, T, n_front + T) of a packed batch.

        doc_ids (B, T): a maximal run of equal values is one document; values < 0 mark shared tokens,
        a leading run of the row. A shared token at row index i sits at position start_pos + i and sees
        the shared tokens up to itself; a document's tokens sit at start_pos + n_shared + (index within
        the document) and see the shared tokens and their own document up to themselves. n_front key
        columns in front (a prefix cache's) are visible to every query.
        """
        B, T = doc_ids.shape
        shared = doc_ids < 0  # (B, T)
        if bool((shared[:, 1:] & ~shared[:, :-1]).any()):
            raise ValueError("doc_ids: shared tokens (doc_ids < 0) must be a leading run of each row")
        t = torch.arange(T, device=doc_ids.device)  # (T,)
        new_doc = torch.ones_like(shared)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T) first token of each run
        run = new_doc.long().cumsum(dim=1)  # (B, T) run number: documents by run, not by value
        doc_start = torch.where(new_doc, t, 0).cummax(dim=1).values  # (B, T) row index where the run began
        n_shared = shared.sum(dim=1, keepdim=True)  # (B, 1)
        positions = start_pos + torch.where(shared, t, n_shared + t - doc_start)  # (B, T), < start_pos + T
        rope = (self.rope_cos[positions], self.rope_sin[positions])  # (B, T, D) each
        causal = t[None, :] <= t[:, None]  # (T, T) key j <= query i
        mask = causal & ((run[:, :, None] == run[:, None, :]) | shared[:, None, :])  # (B, T, T)
        if n_front:
            mask = torch.cat((mask.new_ones(B, T, n_front), mask), dim=2)  # (B, T, n_front + T)
        return rope, mask[:, None]  # mask (B, 1, T, S), broadcast over heads

    def forward(self, idx, targets=None, domains=None, kv_cache: KVCache | None = None, start_pos: int = 0,
                inputs_embeds: torch.Tensor | None = None, *, doc_ids: torch.Tensor | None = None):
        """Next-token logits (B, T, vocab_size) of token ids idx (B, T) at positions start_pos..start_pos+T.

        targets (B, T): token ids to predict, -100 = ignored; gives loss = cross-entropy
            (+ aux_loss_weight * MoE aux loss), else loss is None.
        domains (B,) or (B, T): domain ids, needed by domain-routed MoE layers.
        kv_cache: keys/values of earlier positions are read from it and this call's written to it.
        inputs_embeds (B, T, C): used in place of tok_emb(idx) (soft prompts, fm/models/adapters.py); idx
            still gives the ids that hash-routed MoE layers route by.
        doc_ids (B, T) int64: sequence packing (training/scoring; causal dense models only, no KVCache).
            Each maximal run of equal values in a row is one document: a token attends only to
            earlier tokens of its document and to the row's shared tokens (doc_ids < 0, a leading run,
            e.g. a soft prompt). Positions restart per document: shared token i at start_pos + i, a
            document's k-th token at start_pos + n_shared + k, as if it were alone after the shared
            tokens. A prefix cache (adapters.PrefixTuning) stays visible to all. None: no packing.
            The loss is the mean over all non-ignored targets; set -100 where a target crosses a
            document boundary.
        Returns (logits, loss, aux); aux is {} for a dense model, else holds aux_loss (scalar, mean over MoE
        layers), expert_load (n_moe_layers, n_experts) share of assignments per expert, dropped_tokens
        (n_moe_layers,) assignments over capacity, and ce_loss (scalar, detached) when targets are given.
        """
        B, T = idx.shape
        if start_pos + T > self.cfg.seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed seq_len={self.cfg.seq_len}")
        if doc_ids is None:
            rope = (self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T])  # (T, D) each
            attn_mask, is_causal = self._attention_mask(T, start_pos, kv_cache is not None)
        else:
            if not self.cfg.causal or self.cfg.attention != "dense":
                raise ValueError("doc_ids (sequence packing) needs a causal model with dense attention, "
                                 f"got causal={self.cfg.causal}, attention={self.cfg.attention!r}")
            if isinstance(kv_cache, KVCache):
                raise ValueError("doc_ids (sequence packing) is for training and scoring, not KV-cached generation")
            if tuple(doc_ids.shape) != (B, T):
                raise ValueError(f"doc_ids must have the shape of idx {(B, T)}, got {tuple(doc_ids.shape)}")
            n_front = start_pos if kv_cache is not None else 0  # a prefix cache puts start_pos keys in front
            rope, attn_mask = self._packed_rope_and_mask(doc_ids, start_pos, n_front)  # (B, T, D), (B, 1, T, S)
            is_causal = False
        x = self.drop(self.tok_emb(idx) if inputs_embeds is None else inputs_embeds)  # (B, T, C)
        moe_stats = []
        for block in self.layers:
            x, stats = block(x, rope, attn_mask, is_causal, kv_cache, start_pos, idx, domains)  # (B, T, C)
            if stats is not None:
                moe_stats.append(stats)
        logits = self.lm_head(self.norm(x))  # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        aux = {}
        if moe_stats:
            aux["aux_loss"] = torch.stack([s["aux_loss"] for s in moe_stats]).mean()
            aux["expert_load"] = torch.stack([s["load"] for s in moe_stats])  # (n_moe_layers, E)
            aux["dropped_tokens"] = torch.stack([s["dropped"] for s in moe_stats])  # (n_moe_layers,)
            if loss is not None:
                aux["ce_loss"] = loss.detach()
                loss = loss + self.cfg.aux_loss_weight * aux["aux_loss"]
        return logits, loss, aux

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, domains=None, *, top_p: float | None = None, stop_ids=(),
                 generator: torch.Generator | None = None, on_token=None):
        """Append up to max_new_tokens tokens to idx (B, T) with a KV cache; temperature 0 is greedy.

        Each token is drawn by fm.generation.sample_token: softmax(logits / temperature) cut to the
        top_k most likely tokens and then to the top_p nucleus if given, drawn from `generator` (a
        seeded torch.Generator reproduces the tokens; None: torch's global RNG). A row that emits one of
        stop_ids or eos_id keeps that token and repeats it as padding from then on; generation ends
        once every row has stopped. on_token(next_id (B, 1)) is called with each step's tokens as they
        are chosen (streaming). domains: (B,) for domain-routed MoE models. Returns (B, T + new) ids.
        """
        from fm.generation import check_sampling, stop_ids_with

        if not self.cfg.causal:
            raise ValueError("generate needs a causal model")
        check_sampling(temperature, top_k, top_p)
        B, T = idx.shape
        if T + max_new_tokens > self.cfg.seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds seq_len={self.cfg.seq_len}")
        stops = torch.tensor(stop_ids_with(eos_id, stop_ids), dtype=torch.long, device=idx.device)  # (S,)
        cache = KVCache(self.cfg, B, T + max_new_tokens, device=idx.device, dtype=self.tok_emb.weight.dtype)
        logits, _, _ = self(idx, domains=domains, kv_cache=cache)  # prefill: (B, T, V)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = [idx]
        for step in range(max_new_tokens):
            next_id = sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            if len(stops):
                next_id = torch.where(done[:, None], out[-1][:, -1:], next_id)  # a stopped row repeats its stop id
                done |= torch.isin(next_id[:, 0], stops)
            out.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if step == max_new_tokens - 1 or (len(stops) > 0 and bool(done.all())):
                break
            logits, _, _ = self(next_id, domains=domains, kv_cache=cache, start_pos=T + step)  # (B, 1, V)
        return torch.cat(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B, 1); temperature 0 takes the argmax (fm.generation.sample_token)."""
    from fm.generation import sample_token

    return sample_token(logits, temperature, top_k, top_p, generator)
