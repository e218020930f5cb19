"""Held-out perplexity per modality, source and language, for a torch model or an ONNX graph.

    from fm.eval.perplexity import build_eval_set, heldout_split, perplexity_by_group, torch_logits_fn
    split = heldout_split("data/06_models/pretrain")          # the split pretraining held out
    eval_set = build_eval_set("data/05_tokens/shards", **split, seq_len=128, max_windows_per_group=64)
    model, _ = load_pretrained("data/06_models/pretrain")
    res = perplexity_by_group(torch_logits_fn(model), eval_set, batch_size=16)
    res["overall"]["perplexity"], res["groups"]["text/fortunes/en"]["tokens"]
    int8 = OnnxLM("data/07_export/onnx/prefill.int8.onnx", sha256)   # fm.export.onnx: checked, row by row if dynamic
    res_int8 = perplexity_by_group(torch_logits_fn(int8), eval_set, batch_size=16)

What is held out. The pretraining loader (fm.data.loader.TokenLoader) cuts each modality's token stream
into windows of split_seq_len + 1 tokens and holds out the last `val_fraction` of them; the distill stage
trains on the same train split. build_eval_set asks a TokenLoader(split="val") with the pretraining
recipe's seq_len, val_fraction and mix which window range that is, so the rule lives in one place. The
held-out region of a modality is the token range [first * (split_seq_len + 1), end * (split_seq_len + 1))
of its stream; tokens after the last full window belong to neither split and are not scored, and a
modality with mixing weight 0 has no held-out region (the loader drops it).

Groups. Every document span of the held-out region carries its modality, source and lang in the token
shards' index (fm.data.shards.INDEX_DTYPE), so a group is the triple (modality, source, lang), named
"modality/source/lang" ("" for a missing source or lang). A document cut by the region's start counts
with the part inside the region; one cut by a token-shard boundary is joined back into one span.

Windows and context. Each document span (framed as `<|modality|> <|lang:xx|> text <|endoftext|>` by
the shard stage) is cut into windows of seq_len + 1 tokens that overlap by one token: window k holds
span tokens [k*seq_len, (k+1)*seq_len], its inputs are all but the last and its targets all but the
first. So every token of a span except its first is scored exactly once, and the target at position j
of a window (0-based) is predicted from the j + 1 tokens before it in the same window: context restarts
at every window and never crosses a document. The last window of a span is right-padded with <|pad|>
and its padded targets are ignored; in a causal model padding after a position cannot change it.
max_windows_per_group keeps the first windows of each group in stream order (the shard stage shuffled
documents with its seed), so the set is deterministic for given shards and parameters.

Batch-size invariance. Windows are scored independently (no packing, no cross-row state): the NLL of
each window is summed on its own in float64, and the per-group sums add the windows in their fixed order,
whatever batches they were computed in. A batch only changes which windows share a forward call.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fm.data.loader import TokenLoader
from fm.data.shards import load_manifest, read_index
from fm.data.tokenizer import SPECIAL_IDS

IGNORE = -100  # target id of padding (F.cross_entropy's ignore_index)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) int64 -> logits (B, T, V) float


@dataclass(frozen=True)
class EvalSet:
    """Fixed-length held-out windows, each in one group."""

    inputs: np.ndarray  # (N, T) int64 token ids, right-padded with <|pad|>
    targets: np.ndarray  # (N, T) int64 next-token ids, IGNORE where padded
    group: np.ndarray  # (N,) int64 index into group_names
    group_names: list[str]  # "modality/source/lang"
    seq_len: int  # T

    @property
    def digest(self) -> str:
        """sha256 of the windows and their groups: two reports scored the same set iff their digests agree."""
        h = hashlib.sha256()
        for a in (self.inputs, self.targets, self.group):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        h.update(json.dumps(self.group_names).encode())
        return h.hexdigest()


def heldout_split(pretrain_dir: str | Path) -> dict:
    """The split pretraining held out, from its config.json: {"split_seq_len", "val_fraction", "mix"}."""
    config = json.loads((Path(pretrain_dir) / "config.json").read_text())
    pretrain = config["pretrain"]
    return {"split_seq_len": int(pretrain["seq_len"]), "val_fraction": float(pretrain["val_fraction"]),
            "mix": pretrain.get("mix") or None}


def _spans(shard_dir: Path, manifest: dict, modality: str) -> np.ndarray:
    """Index rows of a modality's stream, starts made global, a document cut by a shard boundary joined."""
    rows, offset = [], 0
    for entry in manifest["shards"]:
        if entry["kind"] == "tokens" and entry["modality"] == modality:
            index = read_index(shard_dir / entry["path"].replace(".bin", ".idx.npy"))
            index["start"] += offset
            rows.append(index)
            offset += entry["tokens"]
    index = np.concatenate(rows)
    first_of_doc = np.flatnonzero(np.diff(index["doc"], prepend=-1) != 0)  # a doc's pieces are adjacent
    joined = index[first_of_doc].copy()
    joined["length"] = np.add.reduceat(index["length"], first_of_doc)
    return joined


def build_eval_set(shard_dir: str | Path, *, split_seq_len: int, val_fraction: float, mix: dict | None = None,
                   seq_len: int = 128, max_windows_per_group: int | None = None) -> EvalSet:
    """The held-out windows of `shard_dir` for the split (split_seq_len, val_fraction, mix) that pretraining
    used (heldout_split gives it), cut into windows of seq_len scored positions, at most max_windows_per_group
    per (modality, source, lang). ValueError if no modality has a held-out window."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    codes = manifest["codes"]
    val = TokenLoader(shard_dir, split_seq_len, 1, mix, split="val", val_fraction=val_fraction)
    pad, window = SPECIAL_IDS["<|pad|>"], split_seq_len + 1

    inputs, targets, groups, names, taken = [], [], [], {}, {}
    for modality in val.modalities:
        first, end = val._windows[modality]  # the loader's own val range (window ids), see TokenLoader.__init__
        lo, hi = first * window, end * window
        stream = np.concatenate([np.asarray(s) for s in val._shards[modality]])  # (tokens,) this modality
        spans = _spans(shard_dir, manifest, modality)
        starts = np.maximum(spans["start"], lo)
        ends = np.minimum(spans["start"] + spans["length"], hi)
        for k in np.flatnonzero(ends - starts >= 2):  # a span of one token has nothing to predict
            name = f"{modality}/{codes['source'][spans['source'][k]]}/{codes['lang'][spans['lang'][k]]}"
            g = names.setdefault(name, len(names))
            for a in range(int(starts[k]), int(ends[k]) - 1, seq_len):
                if max_windows_per_group is not None and taken.get(g, 0) >= max_windows_per_group:
                    break
                ids = stream[a:min(a + seq_len + 1, int(ends[k]))].astype(np.int64)  # (n + 1,) n scored
                row_in, row_tg = np.full(seq_len, pad, np.int64), np.full(seq_len, IGNORE, np.int64)
                row_in[:len(ids) - 1], row_tg[:len(ids) - 1] = ids[:-1], ids[1:]
                inputs.append(row_in)
                targets.append(row_tg)
                groups.append(g)
                taken[g] = taken.get(g, 0) + 1
    if not inputs:
        raise ValueError(f"{shard_dir}: the held-out split has no document span of two or more tokens")
    return EvalSet(np.stack(inputs), np.stack(targets), np.array(groups, np.int64), list(names), seq_len)


def _summary(nll: float, tokens: int) -> dict:
    mean = nll / tokens if tokens else float("nan")
    return {"tokens": int(tokens), "nll": mean, "perplexity": math.exp(mean) if tokens else float("nan")}


def perplexity_by_group(logits_fn: LogitsFn, eval_set: EvalSet, batch_size: int) -> dict:
    """Token-weighted perplexity exp(mean NLL in nats) per group, per modality, source and lang, and overall.

    Returns {"groups": {name: {"tokens", "nll", "perplexity", "modality", "source", "lang"}},
             "modality" / "source" / "lang": {value: {"tokens", "nll", "perplexity"}}, "overall": {...},
             "windows": N, "seq_len": T, "digest": eval_set.digest}. The figures do not depend on batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(eval_set.inputs)
    window_nll = np.zeros(n, np.float64)  # (N,) summed NLL of each window
    window_tokens = (eval_set.targets != IGNORE).sum(axis=1)  # (N,) scored targets of each window
    for a in range(0, n, batch_size):
        ids = torch.from_numpy(eval_set.inputs[a:a + batch_size])  # (B, T)
        tgt = torch.from_numpy(eval_set.targets[a:a + batch_size])  # (B, T)
        logits = logits_fn(ids)  # (B, T, V)
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for ids of shape {tuple(ids.shape)}")
        # fp32 log-softmax per position (row-wise, so no batch effect), summed per window in float64
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (B, T)
        nll = -logp.double().where(tgt != IGNORE, 0.0)  # (B, T)
        window_nll[a:a + len(ids)] = nll.sum(dim=1).numpy()

    out: dict = {"groups": {}, "modality": {}, "source": {}, "lang": {}}
    sums: dict[tuple[str, str], list] = {}
    for g, name in enumerate(eval_set.group_names):
        mask = eval_set.group == g
        nll, tokens = float(window_nll[mask].sum()), int(window_tokens[mask].sum())  # fixed order: window order
        modality, source, lang = name.split("/")
        out["groups"][name] = {**_summary(nll, tokens), "modality": modality, "source": source, "lang": lang}
        for key, value in (("modality", modality), ("source", source), ("lang", lang)):
            acc = sums.setdefault((key, value), [0.0, 0])
            acc[0] += nll
            acc[1] += tokens
    for (key, value), (nll, tokens) in sorted(sums.items()):
        out[key][value] = _summary(nll, tokens)
    out["overall"] = _summary(float(window_nll.sum()), int(window_tokens.sum()))
    out.update(windows=n, seq_len=eval_set.seq_len, digest=eval_set.digest)
    return out


# ---------------------------------------------------------------- adapters

def torch_logits_fn(model: torch.nn.Module, device: str | torch.device = "cpu") -> LogitsFn:
    """logits_fn of an fm model (Decoder, PrefixTuning, PromptTuning, OnnxLM): eval mode, no grad, float32
    logits on the CPU. The model must take seq_len positions (fm.eval.choice.model_max_len)."""
    model.eval()

    @torch.no_grad()
    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device))[0].float().cpu()  # (B, T, V)

    return logits_fn
