"""`fm plan`: the rank map and per-rank memory estimate of a pretraining layout, before launching it.

    fm plan --set pretrain.nproc=8 --set pretrain.tp=2 --set pretrain.pp=2 --set pretrain.parallel=fsdp

Pure functions of the config (no processes, no torch.distributed). The layout is the one
fm/train/parallel.py builds: mesh (pp, dp, tp), rank r at pp = r // (dp*tp), dp = (r // tp) % dp,
tp = r % tp; stage s holds layers `stage_layers(n_layer, pp, s)`, the first stage the embedding,
the last the final norm and LM head. Tensor parallel splits a Linear's weight (out, in) like
DTensor's Shard (torch.chunk: ceil-sized pieces, the last one shorter):
    column-parallel wq, wk, wv, w_gate, w_up, lm_head, tok_emb: rows (dim 0);
    row-parallel wo, w_down: columns (dim 1); norms are replicated.
FSDP2 then shards each tp-local tensor's dim 0 over dp, padded to ceil(rows / dp) rows.

Memory per rank, in bytes (an estimate: allocator slack, buffers and communication buckets are not counted):
    parameters    4 B per local element (fp32 master weights; bf16 autocast keeps them fp32)
    gradients     4 B per local element
    optimizer     8 B per local element (AdamW exp_avg and exp_avg_sq, fp32)
    fsdp_gather   with FSDP: the unsharded tp-local weights of the two largest blocks in flight
                  (the one computing and the one prefetched), 4 B per element
    activations   per layer and in-flight microbatch, Korthikanti et al. 2022 ("Reducing Activation
                  Recomputation in Large Transformer Models", eq. 2, with tensor + sequence parallel):
                      s * b * h * (34 + 5 * a * s / h) / tp   bytes at 16 bits, x 2 in fp32;
                  with recomputation only each layer's input is kept, 2 * s * b * h / tp bytes at 16 bits,
                  plus one layer's full activations while it is recomputed. The last stage adds the
                  logits and their gradient, 2 * b * s * V * 4 bytes (gathered over tp for the loss).
                  In-flight microbatches: pp = 1: 1; GPipe: all m; 1F1B: min(m, pp - stage).
                  The 5 a s / h term is the stored attention matrix: a fused (flash) SDPA kernel does
                  not keep it, so on GPUs the estimate is high by that much.
    cpu offload   parameters, gradients and optimizer state live in host memory: device bytes 0
                  for them (shown in the `host` column), FSDP's gathered blocks stay on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fm.config import PretrainConfig
from fm.models.decoder import ModelConfig
from fm.train.parallel import stage_layers

FP32 = 4


def chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of piece `index` when torch.chunk splits n rows into `parts` (ceil-sized, last shorter)."""
    size = math.ceil(n / parts)
    return min(index * size, n), min((index + 1) * size, n)


@dataclass(frozen=True)
class Rank:
    rank: int
    dp: int
    pp: int
    tp: int
    layers: range
    first: bool  # holds the embedding
    last: bool  # holds the final norm and the LM head
    shards: dict  # weight name -> "rows a:b of N" / "cols a:b of N" / "replicated"
    elements: int  # local parameter elements (tp shard, before FSDP)
    largest_block: int  # tp-local elements of this stage's largest block


def layout(cfg: PretrainConfig) -> tuple[int, int, int]:
    """(dp, pp, tp) of a config; nproc = dp * pp * tp is checked by PretrainConfig."""
    return cfg.nproc // (cfg.tp * cfg.pp), cfg.pp, cfg.tp


def rank_map(cfg: PretrainConfig, mcfg: ModelConfig) -> list[Rank]:
    """Every rank's coordinate, layers and weight shards under cfg's layout."""
    dp, pp, tp = layout(cfg)
    d, hd, f, V = mcfg.d_model, mcfg.head_dim, mcfg.ffn_hidden, mcfg.vocab_size
    q, kv = mcfg.n_head * hd, mcfg.n_kv_head * hd
    ranks = []
    for r in range(cfg.nproc):
        t, data, stage = r % tp, (r // tp) % dp, r // (tp * dp)
        layers = stage_layers(mcfg.n_layer, pp, stage)
        first, last = stage == 0, stage == pp - 1

        def rows(n):
            a, b = chunk(n, tp, t)
            return f"rows {a}:{b} of {n}", b - a

        def cols(n):
            a, b = chunk(n, tp, t)
            return f"cols {a}:{b} of {n}", b - a

        shards, elements = {}, 0
        block = 2 * d  # attn_norm, mlp_norm (replicated)
        for name, (text, n), other in (("wq", rows(q), d), ("wk", rows(kv), d), ("wv", rows(kv), d), ("wo", cols(q), d),
                                       ("w_gate", rows(f), d), ("w_up", rows(f), d), ("w_down", cols(f), d)):
            shards[name] = text
            block += n * other
        shards["attn_norm, mlp_norm"] = "replicated"
        elements += block * len(layers)
        if first:
            shards["tok_emb"], n = rows(V)
            elements += n * d
        if last:
            shards["norm"] = "replicated"
            elements += d
            text, n = rows(V)
            shards["lm_head"] = text + (" (tied to tok_emb)" if mcfg.tie_embeddings else "")
            if not mcfg.tie_embeddings:
                elements += n * d
        ranks.append(Rank(r, data, stage, t, layers, first, last, shards, elements, block))
    return ranks


def memory(cfg: PretrainConfig, mcfg: ModelConfig, rank: Rank, fsdp: bool, recompute: bool, offload: bool) -> dict:
    """Estimated bytes on rank's device (and in host memory with offload): see the module docstring."""
    dp, pp, tp = layout(cfg)
    shard = fsdp and dp > 1
    # FSDP pads every tensor's dim 0 to a multiple of dp; per element that is at most a row, so ceil is close.
    local = math.ceil(rank.elements / dp) if shard else rank.elements
    state = {"params": FP32 * local, "grads": FP32 * local, "optimizer": 2 * FP32 * local}
    gathered = FP32 * 2 * rank.largest_block if shard else 0
    s, h, a, V = cfg.seq_len, mcfg.d_model, mcfg.n_head, mcfg.vocab_size
    b = cfg.batch_size // cfg.pp_microbatches if pp > 1 else cfg.batch_size
    m = cfg.pp_microbatches
    in_flight = 1 if pp == 1 else (m if cfg.pp_schedule == "gpipe" else min(m, pp - rank.pp))
    scale = 2  # fp32 activations: twice the paper's 16-bit bytes (bf16 autocast would keep some at 16 bits)
    full_layer = s * b * h * (34 + 5 * a * s / h) / tp * scale
    n_layers = len(rank.layers)
    if recompute:
        acts = 2 * s * b * h / tp * scale * n_layers * in_flight + full_layer
    else:
        acts = full_layer * n_layers * in_flight
    if rank.last:
        acts += 2 * b * s * V * FP32
    out = {**state, "fsdp_gather": gathered, "activations": int(acts)}
    host = 0
    if offload:
        host = sum(state.values())
        out.update(params=0, grads=0, optimizer=0)
    out["device_total"] = sum(out.values())
    out["host"] = host
    return out


VARIANTS = {  # name -> (fsdp, recompute, offload)
    "plain": (False, False, False),
    "recompute": (False, True, False),
    "fsdp": (True, False, False),
    "fsdp+recompute": (True, True, False),
    "fsdp+recompute+offload": (True, True, True),
}


def plan(cfg: PretrainConfig, mcfg: ModelConfig) -> dict:
    """The rank map and memory of cfg's layout, as configured and under each variant."""
    from fm.train.parallel import check_layout

    check_layout(mcfg, cfg.tp, cfg.pp)
    dp, pp, tp = layout(cfg)
    configured = (cfg.parallel == "fsdp", cfg.activation_checkpointing, cfg.cpu_offload)
    ranks = rank_map(cfg, mcfg)
    return {
        "layout": {"dp": dp, "pp": pp, "tp": tp, "nproc": cfg.nproc, "parallel": cfg.parallel,
                   "global_batch": cfg.batch_size * cfg.grad_accum * dp},
        "ranks": ranks,
        "memory": [memory(cfg, mcfg, r, *configured) for r in ranks],
        "variants": {name: [memory(cfg, mcfg, r, *flags)["device_total"] for r in ranks] for name, flags in VARIANTS.items()},
    }


def print_plan(result: dict, console) -> None:
    """Rich tables: one row per rank, then the what-if totals per variant."""
    from rich.table import Table

    def mib(n):
        return f"{n / 2**20:,.1f}"

    lay = result["layout"]
    console.print(f"[bold]layout[/] dp={lay['dp']} pp={lay['pp']} tp={lay['tp']} ({lay['nproc']} ranks, "
                  f"data parallel: {lay['parallel']}, global batch {lay['global_batch']} sequences)")
    sizes = {}  # weight -> "of N": said once in the title, not in every row
    for r in result["ranks"]:
        sizes.update({k: v.split(" of ")[1].split(" ")[0] for k, v in r.shards.items() if " of " in v})
    table = Table(title="rank map: tp shard of each weight in every layer of the stage (norms replicated; sizes: "
                  + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ")", title_justify="left")
    for col in ("rank", "(dp, pp, tp)", "layers", "weight shards"):
        table.add_column(col, no_wrap=col != "weight shards")
    for r in result["ranks"]:
        extra = (["tok_emb"] if r.first else []) + (["norm", "lm_head"] if r.last else [])
        layers = f"{r.layers.start}-{r.layers.stop - 1}" + ("".join(f" +{e}" for e in extra))
        groups: dict[str, list[str]] = {}
        for name, text in r.shards.items():
            if text != "replicated":
                groups.setdefault(text.split(" of ")[0], []).append(name)
        table.add_row(str(r.rank), f"({r.dp}, {r.pp}, {r.tp})", layers,
                      "; ".join(f"{'/'.join(names)} {where}" for where, names in groups.items()))
    console.print(table)
    table = Table(title="estimated memory per rank, MiB (as configured)", title_justify="left")
    cols = ("params", "grads", "optimizer", "fsdp_gather", "activations", "device_total", "host")
    table.add_column("rank")
    for col in cols:
        table.add_column(col, justify="right")
    for r, m in zip(result["ranks"], result["memory"]):
        table.add_row(str(r.rank), *(mib(m[c]) for c in cols))
    console.print(table)
    table = Table(title="device MiB per rank under each variant (max over ranks; fsdp only shards when dp > 1)",
                  title_justify="left")
    table.add_column("variant")
    table.add_column("max device MiB", justify="right")
    for name, totals in result["variants"].items():
        table.add_row(name, mib(max(totals)))
    console.print(table)
