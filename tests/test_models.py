"""Model tests: the decoder, MoE and sparse attention, each against a reference, on CPU in seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fm.models import PRESETS, Decoder, KVCache, ModelConfig, MoE, build_mask, hash_experts
from fm.models.decoder import MLP, apply_rope, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=32)  # head_dim 8, ffn_hidden 128


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def tokens(B=2, T=16, vocab=64, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config


def test_config_roundtrip_json_and_strict():
    cfg = tiny(moe_layers="every_2", n_experts=4, moe_routing="top1", attention="strided", attn_window=4, attn_stride=3)
    assert cfg.moe_layers == (1,) and cfg.n_kv_head == 4 and cfg.ffn_hidden == 128
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 32})
    with pytest.raises(ValueError):
        tiny(n_head=3)  # 32 does not split into 3 heads
    with pytest.raises(ValueError):
        tiny(moe_layers=(5,))
    assert tiny(moe_layers="all").moe_layers == (0, 1) and tiny(moe_layers="none").moe_layers == ()


def test_small_preset_param_count_matches_hand_formula():
    cfg = PRESETS["small"]
    V, L, d, h = 8192, 6, 384, 1024  # ffn_hidden = 8/3 * 384 = 1024, already a multiple of 64
    per_block = 4 * d * d + 3 * d * h + 2 * d  # wq, wk, wv, wo + w_gate, w_up, w_down + 2 RMSNorm weights
    expected = V * d + L * per_block + d  # tied embedding / head + blocks + final norm
    model = Decoder(cfg)
    actual = sum(p.numel() for p in model.parameters())
    print(f"small preset: {actual:,} parameters ({cfg.num_params(non_embedding=True):,} non-embedding)")
    assert actual == expected == cfg.num_params() == 13_767_552
    assert cfg.num_params(non_embedding=True) == expected - V * d
    assert cfg.flops_per_token() == 6 * expected + 12 * L * d * 256  # tied: N = all parameters


def test_param_count_formula_with_gqa_untied_and_moe():
    cfg = tiny(n_kv_head=2, tie_embeddings=False, moe_layers=(1,), n_experts=4, moe_routing="topk", moe_top_k=2)
    assert cfg.num_params() == sum(p.numel() for p in Decoder(cfg).parameters())
    expert = 3 * 32 * 128
    assert cfg.num_params() - cfg.num_params(active=True) == 2 * expert  # 4 experts held, 2 used per token


# ---------------------------------------------------------------- decoder


def test_rope_matches_complex_rotation_and_is_relative():
    B, T, H, D = 1, 6, 2, 8
    x = torch.randn(B, T, H, D)
    cos, sin = rope_tables(T, D, 10000.0)
    angles = torch.outer(torch.arange(T).double(), 10000.0 ** (-torch.arange(0, D, 2).double() / D))  # (T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]  # (T, 1, D/2) e^(i pos theta_j)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * rotation  # halves = (real, imag)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.cat((z.real, z.imag), -1).float())
    q, k = torch.randn(D).expand(T, 1, 1, D), torch.randn(D).expand(T, 1, 1, D)  # same q, k at every position
    rq, rk = apply_rope(q.transpose(0, 1), cos, sin)[0, :, 0], apply_rope(k.transpose(0, 1), cos, sin)[0, :, 0]  # (T, D)
    torch.testing.assert_close(rq[3] @ rk[1], rq[5] @ rk[3])  # depends on the distance only


def test_forward_shapes_and_tied_weights():
    model = Decoder(tiny())
    idx = tokens()
    logits, loss, aux = model(idx)
    assert logits.shape == (2, 16, 64) and loss is None and aux == {}
    assert model.lm_head.weight is model.tok_emb.weight
    untied = Decoder(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_tied_model_loads_a_state_dict_without_its_head_strictly():
    """A tied model's saved weights hold the shared matrix once (tok_emb.weight); strict loading accepts that."""
    model = Decoder(tiny())
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    other = Decoder(tiny(init_std=0.05))
    other.load_state_dict(sd)  # strict
    assert other.lm_head.weight is other.tok_emb.weight and torch.equal(other.lm_head.weight, model.tok_emb.weight)
    idx = tokens()
    assert torch.equal(other(idx)[0], model(idx)[0])
    untied = Decoder(tiny(tie_embeddings=False))
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        untied.load_state_dict({k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"})


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_initial_loss_is_uniform(preset):
    """At init the model should be unsure: cross-entropy on random tokens ~ ln(vocab)."""
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Decoder(cfg)
    idx, targets = tokens(2, 64, cfg.vocab_size, 1), tokens(2, 64, cfg.vocab_size, 2)
    with torch.no_grad():
        _, loss, _ = model(idx, targets)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1 * math.log(cfg.vocab_size)


def test_loss_ignores_minus_100_and_trains():
    torch.manual_seed(0)
    model = Decoder(tiny())
    idx = tokens()
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    _, loss, _ = model(idx, targets)
    logits, _, _ = model(idx)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), targets[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, ref)
    for _ in range(20):  # plain SGD: memorizes the two sequences
        model.zero_grad()
        _, loss2, _ = model(idx, targets)
        loss2.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    assert loss2.item() < 0.5 * loss.item()


def test_causality_future_tokens_do_not_change_past_logits():
    model = Decoder(tiny()).eval()
    idx = tokens()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    torch.testing.assert_close(model(idx)[0][:, :10], model(changed)[0][:, :10])


def test_encoder_variant_is_bidirectional():
    model = Decoder(tiny(causal=False)).eval()
    idx = tokens()
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    assert not torch.allclose(model(idx)[0][:, 0], model(changed)[0][:, 0])
    with pytest.raises(ValueError):
        model.generate(idx, 4)


@pytest.mark.parametrize("overrides", [
    {},
    {"n_kv_head": 2},
    {"attention": "strided", "attn_window": 3, "attn_stride": 4},
    {"moe_layers": "all", "n_experts": 4, "moe_routing": "topk", "capacity_factor": 0.0},
    {"moe_layers": (1,), "n_experts": 4, "moe_routing": "hash"},
])
def test_kv_cache_generation_equals_uncached_greedy(overrides):
    torch.manual_seed(0)
    model = Decoder(tiny(**overrides)).eval()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, max_new_tokens=12, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):  # no cache: rerun the whole sequence every step
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, seq)


def test_chunked_prefill_matches_full_forward():
    """Feeding a sequence through the cache in chunks gives the same logits as one forward pass."""
    model = Decoder(tiny()).eval()
    idx = tokens(2, 12)
    cache = KVCache(model.cfg, batch_size=2, max_len=12)
    with torch.no_grad():
        full = model(idx)[0]
        parts = [model(idx[:, a:b], kv_cache=cache, start_pos=a)[0] for a, b in [(0, 5), (5, 9), (9, 10), (10, 12)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_eos_pads_and_stops():
    torch.manual_seed(0)
    model = Decoder(tiny()).eval()
    prompt = tokens(1, 4)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first
    sampled = model.generate(prompt, 6, temperature=0.8, top_k=5)
    assert sampled.shape == (1, 10) and sampled.max() < 64


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = Decoder(tiny(moe_layers=(1,), n_experts=4, moe_routing="top1"))
    idx, targets = tokens(), tokens(seed=1)
    logits, loss, _ = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16, _ = model(idx, targets)
        loss16.backward()
    assert logits16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss.item()) < 0.05
    assert (logits16.float() - logits).abs().max() < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- MoE


def _dense_and_moe(routing, d=32, h=64):
    torch.manual_seed(0)
    mlp = MLP(d, h)
    mlp.init_weights(0.1, 0.1)
    moe = MoE(d, h, n_experts=1, routing=routing, top_k=1)
    moe.load_dense(mlp)
    return mlp, moe


@pytest.mark.parametrize("routing", ["top1", "topk", "hash", "domain"])
def test_one_expert_moe_equals_dense_mlp(routing):
    mlp, moe = _dense_and_moe(routing)
    x = torch.randn(2, 16, 32)
    out, stats = moe(x, token_ids=tokens(), domains=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, mlp(x), atol=1e-6, rtol=0)
    assert stats["dropped"].item() == 0 and stats["load"].tolist() == [1.0]


def test_one_expert_moe_decoder_equals_dense_decoder():
    """Whole model: an all-MoE decoder with one expert, upcycled from a dense one, gives the same loss."""
    dense = Decoder(tiny())
    moe = Decoder(tiny(moe_layers="all", n_experts=1, moe_routing="top1", aux_loss_weight=0.0))
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert all(".mlp." in key for key in missing + unexpected)  # only the FFNs differ
    for dense_block, moe_block in zip(dense.layers, moe.layers):
        moe_block.mlp.load_dense(dense_block.mlp)
    idx, targets = tokens(), tokens(seed=1)
    _, loss_dense, _ = dense(idx, targets)
    _, loss_moe, aux = moe(idx, targets)
    torch.testing.assert_close(loss_moe, loss_dense, atol=1e-6, rtol=0)
    assert aux["expert_load"].shape == (2, 1) and aux["aux_loss"].item() == pytest.approx(1.0)


def test_hash_routing_is_deterministic_across_instances_and_rng():
    ids = torch.arange(1000).view(10, 100)
    x = torch.randn(10, 100, 16)
    loads = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        moe = MoE(16, 32, n_experts=8, routing="hash")
        _, stats = moe(x, token_ids=ids)
        loads.append(stats["load"])
    torch.testing.assert_close(loads[0], loads[1], atol=0, rtol=0)
    experts = hash_experts(ids, 8)
    assert torch.equal(experts, hash_experts(ids.clone(), 8))
    assert experts[0, :10].tolist() == hash_experts(torch.arange(10), 8).tolist()
    assert torch.bincount(experts.flatten(), minlength=8).min() > 1000 / 8 * 0.7  # roughly balanced
    assert (loads[0] > 0).all() and moe.router is None


def test_domain_routing_sends_domain_d_to_expert_d():
    torch.manual_seed(0)
    moe = MoE(16, 32, n_experts=3, routing="domain")
    x = torch.randn(3, 5, 16)
    domains = torch.tensor([2, 0, 2])
    out, stats = moe(x, domains=domains)
    assert stats["load"].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3])
    for b, d in enumerate(domains.tolist()):  # each row equals expert d alone
        expert = MLP(16, 32)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(expert, name).weight.copy_(getattr(moe, name)[d])
        torch.testing.assert_close(out[b], expert(x[b]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        moe(x, domains=torch.tensor([0, 1, 3]))


def test_switch_aux_loss_is_one_when_balanced_and_e_when_collapsed():
    E, d = 4, 8
    moe = MoE(d, 16, n_experts=E, routing="top1", capacity_factor=0.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, d) * 5.0)  # token along axis e -> expert e, confidently
    balanced = torch.eye(E, d).repeat(6, 1).view(1, 6 * E, d)  # 6 tokens per expert
    _, stats = moe(balanced)
    assert stats["load"].tolist() == [0.25] * 4
    assert stats["aux_loss"].item() == pytest.approx(1.0)
    collapsed = torch.eye(E, d)[:1].repeat(24, 1).view(1, 24, d) * 10  # every token -> expert 0, p ~ 1
    _, stats = moe(collapsed)
    assert stats["load"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stats["aux_loss"].item() == pytest.approx(E, rel=1e-3)


@pytest.mark.parametrize("routing,k", [("top1", 1), ("topk", 2)])
def test_capacity_drops_overflow_and_counts_it(routing, k):
    E, d, N = 4, 8, 16
    moe = MoE(d, 16, n_experts=E, routing=routing, top_k=k, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, d) * 5.0)
    x = torch.eye(E, d)[:1].repeat(N, 1).view(1, N, d)  # all tokens prefer expert 0
    x[0, :, 1] = 0.5  # ... and expert 1 second
    out, stats = moe(x)
    capacity = math.ceil(1.0 * N * k / E)  # 4 (top1) or 8 (top2) assignments per expert
    # expert 0 (and for top2 expert 1) fills up with the earliest `capacity` tokens; the rest is dropped
    assert stats["dropped"].item() == N * k - capacity * k
    assert (out[0, :capacity].abs().sum(-1) > 0).all()
    assert (out[0, capacity:] == 0).all()  # no expert left: the FFN contributes exactly zero
    unlimited = MoE(d, 16, n_experts=E, routing=routing, top_k=k, capacity_factor=0.0)
    unlimited.load_state_dict(moe.state_dict())
    assert unlimited(x)[1]["dropped"].item() == 0


def test_moe_decoder_aux_and_backward():
    torch.manual_seed(0)
    cfg = tiny(moe_layers="every_2", n_experts=4, moe_routing="topk", moe_top_k=2, aux_loss_weight=0.1)
    model = Decoder(cfg)
    idx, targets = tokens(), tokens(seed=1)
    _, loss, aux = model(idx, targets)
    assert aux["expert_load"].shape == (1, 4) and aux["dropped_tokens"].shape == (1,)
    torch.testing.assert_close(aux["expert_load"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(loss, aux["ce_loss"] + 0.1 * aux["aux_loss"])
    loss.backward()
    assert model.layers[1].mlp.router.weight.grad.abs().sum() > 0
    assert model.layers[1].mlp.w_down.grad.abs().sum() > 0
    domain = Decoder(tiny(moe_layers=(0,), n_experts=2, n_domains=2, moe_routing="domain"))
    assert domain(idx, targets, domains=torch.tensor([0, 1]))[2]["expert_load"].tolist() == [[0.5, 0.5]]


# ---------------------------------------------------------------- sparse attention


def test_sparse_masks_match_hand_written_cases():
    T = 8
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    local = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-3)  # window 3: i-2..i
    assert torch.equal(build_mask("local", T, window=3), local)
    strided = build_mask("strided", T, window=2, stride=3)
    assert strided[7].nonzero().flatten().tolist() == [1, 4, 6, 7]  # 7-6, 7 (window 2), 4, 1 (every 3rd back)
    assert strided[2].nonzero().flatten().tolist() == [1, 2]
    fixed = build_mask("fixed", T, stride=4, summary=1)  # blocks [0..3] [4..7]; summary column 3
    expected_fixed = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(fixed, expected_fixed)
    assert build_mask("fixed", T, stride=4, summary=2)[5].nonzero().flatten().tolist() == [2, 3, 4, 5]
    for pattern in ("dense", "local", "strided", "fixed"):
        mask = build_mask(pattern, T, window=1, stride=2)
        assert mask.diagonal().all() and not mask.triu(1).any()  # self always, future never


def test_sparse_mask_of_shorter_sequence_is_a_slice():
    for pattern in ("local", "strided", "fixed"):
        assert torch.equal(build_mask(pattern, 20, 3, 4, 2)[:7, :7], build_mask(pattern, 7, 3, 4, 2))


@pytest.mark.parametrize("overrides", [
    {"attention": "local", "attn_window": 32},
    {"attention": "strided", "attn_window": 2, "attn_stride": 1},
    {"attention": "fixed", "attn_stride": 32, "attn_summary": 1},
])
def test_covering_sparse_pattern_equals_dense_attention(overrides):
    torch.manual_seed(0)
    dense = Decoder(tiny()).eval()
    sparse = Decoder(tiny(**overrides)).eval()
    sparse.load_state_dict(dense.state_dict())
    idx = tokens(2, 32)
    torch.testing.assert_close(sparse(idx)[0], dense(idx)[0], atol=1e-5, rtol=1e-5)


def test_local_attention_limits_receptive_field():
    """With window 2 in each of 2 layers, logits at t depend on tokens t-2..t only."""
    model = Decoder(tiny(attention="local", attn_window=2)).eval()
    idx = tokens(1, 16)
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 64
    diff = (model(idx)[0] - model(changed)[0]).abs().amax(-1)[0]  # (T,)
    assert (diff[:5] == 0).all() and (diff[8:] == 0).all() and (diff[5:8] > 0).all()
