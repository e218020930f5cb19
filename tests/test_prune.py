"""MLP-channel pruning tests (fm/export/prune.py) on tiny CPU Decoders, each against a reference: keep_fraction 1
against the unpruned logits (bit for bit), zeroed w_down columns against the unpruned logits, the importance
against a by-hand recomputation of the forward pass, the pruned model's saved/loaded copy and its ONNX prefill
graph against torch, recovery against its own starting KD loss; and the refusals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm.export.onnx import export_prefill, load_session
from fm.export.prune import evaluate, kept_width, mlp_importance, prune_mlp, recover, slice_mlp
from fm.models.decoder import Decoder, ModelConfig
from fm.models.pretrained import load_decoder
from fm.train.checkpoint import export_model
from fm.train.distill import distill_loss
from fm.train.parallel import Dist

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 2 layers of width 32, 4 heads; ffn_hidden 128 (SwiGLU's 8/3 * 32 rounded up to 64). init_std 0.15 so
# the MLPs matter to the logits and pruning them shows.
TINY = dict(vocab_size=96, seq_len=48, n_layer=2, n_head=4, d_model=32, init_std=0.15)


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**{**TINY, **overrides})).eval()


def token_batches(n: int, batch: int = 4, length: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (batch, length), generator=g) for _ in range(n)]


def logits(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def test_kept_width_rounds_to_the_multiple():
    assert kept_width(704, 0.75, 16) == 528 and kept_width(704, 0.5, 16) == 352
    assert kept_width(704, 0.75, 64) == 512  # 528 / 64 = 8.25 -> 8 * 64
    assert kept_width(128, 0.01, 16) == 16  # never below one multiple
    assert kept_width(100, 1.0, 16) == 100  # 1 keeps everything, multiple or not


def test_keep_all_is_bit_identical_and_leaves_model_and_rng_alone():
    model, batches = tiny_decoder(), token_batches(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    pruned, info = prune_mlp(model, 1.0, batches)
    assert torch.equal(torch.get_rng_state(), rng)
    assert pruned is not model and pruned.cfg == model.cfg
    assert info["ffn_hidden"] == {"before": 128, "after": 128} and info["params"]["before"] == info["params"]["after"]
    for ids in batches:
        assert torch.equal(logits(pruned, ids), logits(model, ids))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_channels_with_zero_w_down_score_zero_and_are_pruned_first():
    model, batches = tiny_decoder(), token_batches(2)
    g = torch.Generator().manual_seed(2)
    dead = [torch.randperm(128, generator=g)[:32] for _ in model.layers]  # a different quarter in each layer
    with torch.no_grad():
        for block, d in zip(model.layers, dead):
            block.mlp.w_down.weight[:, d] = 0.0
    scores = mlp_importance(model, batches)  # (2, 128)
    for i, d in enumerate(dead):
        assert (scores[i, d] == 0).all()
        alive = torch.ones(128, dtype=torch.bool)
        alive[d] = False
        assert (scores[i, alive] > 0).all()

    pruned, info = prune_mlp(model, 0.75, batches, multiple_of=16)
    assert pruned.cfg.ffn_hidden == 96 and info["removed_score_share"] == [0.0, 0.0]
    for block, old, d in zip(pruned.layers, model.layers, dead):
        kept = torch.tensor(sorted(set(range(128)) - set(d.tolist())))
        assert torch.equal(block.mlp.w_gate.weight, old.mlp.w_gate.weight[kept])
        assert torch.equal(block.mlp.w_up.weight, old.mlp.w_up.weight[kept])
        assert torch.equal(block.mlp.w_down.weight, old.mlp.w_down.weight[:, kept])
    ids = token_batches(1, seed=7)[0]  # not the calibration tokens
    torch.testing.assert_close(logits(pruned, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_importance_equals_a_by_hand_recomputation():
    model, batches = tiny_decoder(seed=3), token_batches(2, length=10)
    cfg = model.cfg
    sum_sq = torch.zeros(cfg.n_layer, cfg.ffn_hidden, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for ids in batches:  # the forward pass written out, the MLP input taken by hand
            T = ids.shape[1]
            rope = (model.rope_cos[:T], model.rope_sin[:T])
            x = model.tok_emb(ids)  # (B, T, C)
            for i, block in enumerate(model.layers):
                x = x + block.attn(block.attn_norm(x), rope, None, True)
                u = block.mlp_norm(x)  # (B, T, C)
                for b in range(ids.shape[0]):
                    for t in range(T):
                        for c in range(cfg.ffn_hidden):
                            gate = float(u[b, t] @ block.mlp.w_gate.weight[c])
                            up = float(u[b, t] @ block.mlp.w_up.weight[c])
                            sum_sq[i, c] += (gate / (1 + math.exp(-gate)) * up) ** 2
                x = x + block.mlp(u)
            tokens += ids.numel()
    w_down_norms = torch.stack([b.mlp.w_down.weight.double().norm(dim=0) for b in model.layers])
    expected = (sum_sq / tokens).sqrt() * w_down_norms
    torch.testing.assert_close(mlp_importance(model, batches).double(), expected, rtol=1e-5, atol=1e-9)


def test_pruned_model_saves_loads_and_exports_to_onnx(tmp_path):
    model = tiny_decoder()
    pruned, info = prune_mlp(model, 0.5, token_batches(2), multiple_of=16)
    assert pruned.cfg.ffn_hidden == 64 and info["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert info["params"]["after"] < info["params"]["before"]
    export_model(pruned, pruned.cfg, tmp_path / "pruned", Dist())
    loaded = load_decoder(tmp_path / "pruned").eval()
    assert loaded.cfg.ffn_hidden == 64
    ids = token_batches(1, batch=3, length=17, seed=5)[0]  # a shape the export never saw
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))

    sha = export_prefill(loaded, tmp_path / "prefill.onnx")
    session = load_session(tmp_path / "prefill.onnx", sha)
    onnx_logits = session.run(["logits"], {"ids": ids.numpy().astype(np.int64)})[0]
    np.testing.assert_allclose(onnx_logits, logits(pruned, ids).numpy(), atol=1e-4, rtol=0)


def test_recovery_lowers_the_kd_loss_deterministically():
    teacher = tiny_decoder()
    windows = token_batches(2, batch=4, length=25, seed=11)
    train = [(w[:, :-1], w[:, 1:]) for w in windows]
    pruned, _ = prune_mlp(teacher, 0.5, [x for x, _ in train])
    twin = copy.deepcopy(pruned)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def kd_loss(model) -> float:
        with torch.no_grad():
            return sum(distill_loss(model(x)[0], teacher(x)[0], y, 2.0, 1.0).kd_loss.item() for x, y in train)

    start = kd_loss(pruned)
    curve = recover(pruned, teacher, train, steps=30, lr=3e-3, temperature=2.0, alpha=1.0)
    assert len(curve) == 30 and not pruned.training and not teacher.training
    assert kd_loss(pruned) < 0.7 * start
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert recover(twin, teacher, train, steps=30, lr=3e-3, temperature=2.0, alpha=1.0) == curve  # fixed seed


def test_evaluate_matches_a_direct_computation():
    model, other = tiny_decoder(), tiny_decoder(seed=9)
    windows = token_batches(1, batch=5, length=20, seed=4)[0]
    full = logits(model, windows)
    ppl = math.exp(F.cross_entropy(full[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())
    same = evaluate(model, windows, reference=model, batch_size=2)
    assert same["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert same["top1_agreement"] == 1.0 and same["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    vs_other = evaluate(model, windows, reference=other)
    agree = (full.argmax(-1) == logits(other, windows).argmax(-1)).float().mean().item()
    assert vs_other["top1_agreement"] == pytest.approx(agree) and vs_other["kl_to_reference"] > 0


def test_bad_arguments_are_refused():
    model, batches = tiny_decoder(), token_batches(1)
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="keep_fraction must be in"):
            prune_mlp(model, keep, batches)
    with pytest.raises(ValueError, match="nothing would be pruned"):
        prune_mlp(model, 0.99, batches)
    with pytest.raises(ValueError, match="multiple_of"):
        prune_mlp(model, 0.5, batches, multiple_of=0)
    with pytest.raises(ValueError, match="MoE"):
        prune_mlp(tiny_decoder(moe_layers="all"), 0.5, batches)
    with pytest.raises(ValueError, match="float32"):
        prune_mlp(tiny_decoder().to(torch.bfloat16), 0.5, batches)
    with pytest.raises(ValueError, match="needs an fm Decoder"):
        prune_mlp(torch.nn.Linear(4, 4), 0.5, batches)
    with pytest.raises(ValueError, match="at least one calibration token"):
        prune_mlp(model, 0.5, [])
    with pytest.raises(ValueError, match="integer token ids"):
        prune_mlp(model, 0.5, [torch.randn(2, 8)])
    with pytest.raises(ValueError, match="same positive count"):
        slice_mlp(model, [torch.arange(64), torch.arange(32)])
    with pytest.raises(ValueError, match="distinct indices"):
        slice_mlp(model, [torch.zeros(64, dtype=torch.int64), torch.arange(64)])
    pruned, _ = prune_mlp(model, 0.5, batches)
    train = [(batches[0], batches[0])]
    with pytest.raises(ValueError, match="steps must be a positive int"):
        recover(pruned, model, train, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be positive"):
        recover(pruned, model, train, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="not the pruned one"):
        recover(pruned, pruned, train, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="at least one training batch"):
        recover(pruned, model, [], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="alpha"):
        recover(pruned, model, train, steps=1, lr=1e-3, alpha=2.0)
