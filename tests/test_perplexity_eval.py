"""Held-out perplexity: the eval set holds exactly the pretraining val split's tokens, each in its document's
group; the figures equal a hand computation, do not depend on the batch size, and an ONNX graph of the
model scores what the model scores.

    pytest tests/test_perplexity_eval.py
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fm.data.schema import MODALITIES
from fm.data.shards import INDEX_DTYPE, TokenShardWriter, _token_entries
from fm.eval.perplexity import IGNORE, build_eval_set, perplexity_by_group, torch_logits_fn
from fm.export.onnx import OnnxLM, export_prefill
from fm.io import sha256_file
from fm.models.decoder import Decoder, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 96
SPLIT = dict(split_seq_len=15, val_fraction=0.25, mix={"text": 1.0, "code": 1.0})  # windows of 16 tokens
CODES = {"modality": list(MODALITIES), "source": ["", "web", "wiki"], "lang": ["", "en", "zh"]}
# (modality, source, lang) of each document in stream order, and its length in tokens
DOCS = {
    "text": [("web", "en", 7), ("wiki", "zh", 23), ("web", "en", 2), ("wiki", "en", 31), ("web", "zh", 11),
             ("", "", 5), ("wiki", "zh", 40), ("web", "en", 9), ("wiki", "en", 17), ("web", "en", 13)],
    "code": [("web", "", 19), ("wiki", "", 29), ("web", "", 3), ("wiki", "", 37), ("web", "", 8), ("wiki", "", 26)],
}


def token_of(modality: str, k: int) -> int:
    """Every token of document k of a modality is this id, so a window shows which document it came from."""
    return 10 + k + (0 if modality == "text" else 40)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A mini shard folder written by the shard stage's TokenShardWriter; shards of 40 tokens cut documents."""
    out = tmp_path_factory.mktemp("shards")
    dtype = np.dtype("<u2")
    entries = []
    for modality, docs in DOCS.items():
        writer = TokenShardWriter(out, modality, 40, dtype)
        lengths = np.array([n for *_, n in docs])
        index = np.zeros(len(docs), INDEX_DTYPE)
        index["start"], index["length"], index["doc"] = np.cumsum(lengths) - lengths, lengths, np.arange(len(docs))
        index["modality"] = MODALITIES.index(modality)
        index["source"] = [CODES["source"].index(s) for s, _, _ in docs]
        index["lang"] = [CODES["lang"].index(lang) for _, lang, _ in docs]
        writer.add(np.concatenate([np.full(n, token_of(modality, k), dtype) for k, (*_, n) in enumerate(docs)]), index)
        writer.flush()
        entries += _token_entries(writer, CODES, dtype)
    manifest = {"dtype": dtype.str, "tokenizer": {"vocab_size": VOCAB}, "codes": CODES, "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def expected_tokens(split_seq_len: int, val_fraction: float) -> Counter:
    """Scored tokens per group, by the split rule written out: a token of the last val_fraction of full
    windows is scored when the token before it is in the region and in the same document."""
    want: Counter = Counter()
    for modality, docs in DOCS.items():
        doc_at = np.concatenate([np.full(n, k) for k, (*_, n) in enumerate(docs)])  # (tokens,)
        window = split_seq_len + 1
        n = len(doc_at) // window
        lo, hi = (n - round(n * val_fraction)) * window, n * window
        for p in range(lo + 1, hi):
            if doc_at[p] == doc_at[p - 1]:
                source, lang, _ = docs[doc_at[p]]
                want[f"{modality}/{source}/{lang}"] += 1
    return want


def tiny_decoder(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(vocab_size=VOCAB, seq_len=48, n_layer=2, n_head=4, d_model=32)).eval()


def test_windows_hold_the_val_split_each_in_its_documents_group(shard_dir):
    eval_set = build_eval_set(shard_dir, **SPLIT, seq_len=6)
    inverse = {token_of(m, k): f"{m}/{s}/{lang}" for m, docs in DOCS.items() for k, (s, lang, _) in enumerate(docs)}
    got: Counter = Counter()
    for inputs, targets, g in zip(eval_set.inputs, eval_set.targets, eval_set.group):
        n = int((targets != IGNORE).sum())
        assert n >= 1 and (targets[n:] == IGNORE).all()
        ids = set(inputs[:n].tolist()) | set(targets[:n].tolist())
        assert len(ids) == 1, "a window never crosses a document"
        assert inverse[ids.pop()] == eval_set.group_names[g]
        got[eval_set.group_names[g]] += n
    assert got == expected_tokens(SPLIT["split_seq_len"], SPLIT["val_fraction"])
    assert build_eval_set(shard_dir, **SPLIT, seq_len=6).digest == eval_set.digest  # deterministic

    capped = build_eval_set(shard_dir, **SPLIT, seq_len=6, max_windows_per_group=1)
    assert sorted(Counter(capped.group.tolist()).values()) == [1] * len(capped.group_names)
    only_text = build_eval_set(shard_dir, **{**SPLIT, "mix": {"text": 1.0}}, seq_len=6)
    assert {name.split("/")[0] for name in only_text.group_names} == {"text"}


def test_figures_equal_a_hand_computation(shard_dir):
    model = tiny_decoder()
    eval_set = build_eval_set(shard_dir, **SPLIT, seq_len=8)
    res = perplexity_by_group(torch_logits_fn(model), eval_set, batch_size=4)
    sums: dict[str, list] = {}
    with torch.no_grad():
        for inputs, targets, g in zip(eval_set.inputs, eval_set.targets, eval_set.group):
            logits = model(torch.from_numpy(inputs)[None])[0][0].double()  # (T, V), one window alone
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            acc = sums.setdefault(eval_set.group_names[g], [0.0, 0])
            for j, t in enumerate(targets.tolist()):
                if t != IGNORE:
                    acc[0] -= float(logp[j, t])
                    acc[1] += 1
    assert set(res["groups"]) == set(sums)
    for name, (nll, tokens) in sums.items():
        assert res["groups"][name]["tokens"] == tokens
        assert res["groups"][name]["nll"] == pytest.approx(nll / tokens, abs=1e-6)
        assert res["groups"][name]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    total_nll, total_tokens = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    assert res["overall"]["tokens"] == total_tokens
    assert res["overall"]["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-6)
    text = [v for name, v in sums.items() if name.startswith("text/")]
    assert res["modality"]["text"]["perplexity"] == pytest.approx(
        math.exp(sum(v[0] for v in text) / sum(v[1] for v in text)), rel=1e-6)


def test_batch_size_does_not_change_the_figures(shard_dir):
    model = tiny_decoder(1)
    eval_set = build_eval_set(shard_dir, **SPLIT, seq_len=8)
    one, three, eight = (perplexity_by_group(torch_logits_fn(model), eval_set, b) for b in (1, 3, 8))
    for other in (three, eight):
        assert other.keys() == one.keys() and other["groups"].keys() == one["groups"].keys()
        for name, fig in one["groups"].items():
            assert other["groups"][name]["tokens"] == fig["tokens"]
            assert other["groups"][name]["nll"] == pytest.approx(fig["nll"], rel=1e-9, abs=1e-12)
        assert other["overall"]["nll"] == pytest.approx(one["overall"]["nll"], rel=1e-9, abs=1e-12)


def test_onnx_graph_scores_what_the_model_scores(shard_dir, tmp_path):
    model = tiny_decoder(2)
    eval_set = build_eval_set(shard_dir, **SPLIT, seq_len=8)
    (tmp_path / "onnx").mkdir()
    sha = export_prefill(model, tmp_path / "onnx" / "prefill.onnx")
    ref = perplexity_by_group(torch_logits_fn(model), eval_set, batch_size=5)
    got = perplexity_by_group(torch_logits_fn(OnnxLM(tmp_path / "onnx" / "prefill.onnx", sha)), eval_set, batch_size=5)
    for name, fig in ref["groups"].items():
        assert got["groups"][name]["tokens"] == fig["tokens"]
        assert got["groups"][name]["nll"] == pytest.approx(fig["nll"], abs=1e-4)
    assert got["overall"]["perplexity"] == pytest.approx(ref["overall"]["perplexity"], rel=1e-4)

    with pytest.raises(ValueError, match="sha256"):
        OnnxLM(tmp_path / "onnx" / "prefill.onnx", "0" * 64)  # a graph other than the one recorded is refused
    assert sha256_file(tmp_path / "onnx" / "prefill.onnx") == sha
