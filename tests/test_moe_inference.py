"""MoE at inference: in eval mode a row's logits do not depend on the rest of the batch, and KV-cached
generation equals a full recompute; in training mode expert capacity still drops. CPU, seconds.

Capacity is ceil(capacity_factor * tokens * k / E) over the whole batch, so every case here uses a
capacity factor (0.5) small enough that a batch always overflows it: a model that dropped at eval
would fail the batch and cache comparisons.
"""

from __future__ import annotations

import math

import pytest
import torch

from fm.models import Decoder, KVCache, ModelConfig, MoE


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROUTING_CONFIGS = {
    "top1": dict(moe_routing="top1"),
    "topk": dict(moe_routing="topk", moe_top_k=2),
    "hash": dict(moe_routing="hash"),
    "domain": dict(moe_routing="domain", n_domains=4),
}
ROUTINGS = list(ROUTING_CONFIGS)
TINY_MOE = dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=32, moe_layers="all", n_experts=4,
                capacity_factor=0.5)


def moe_decoder(routing: str, **overrides) -> Decoder:
    """2-layer d=32 decoder with 4 experts in every layer and capacity 0.5 (always exceeded in training)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MOE, **ROUTING_CONFIGS[routing], **overrides})
    model = Decoder(cfg)
    with torch.no_grad():  # a sharper router than init's near-uniform one, so rows really prefer different experts
        for block in model.layers:
            if block.mlp.router is not None:
                block.mlp.router.weight.normal_(std=1.0)
    return model.eval()


def tokens(B, T, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def domains_of(routing: str, B: int):
    return torch.arange(B) % 4 if routing == "domain" else None


@pytest.mark.parametrize("routing", ROUTINGS)
def test_row_logits_alone_equal_row_in_batch(routing):
    model = moe_decoder(routing)
    idx, domains = tokens(4, 16), domains_of(routing, 4)
    with torch.no_grad():
        batch, _, aux = model(idx, domains=domains)  # (4, 16, V)
        assert aux["dropped_tokens"].sum().item() == 0
        for i in range(4):
            alone = model(idx[i:i + 1], domains=None if domains is None else domains[i:i + 1])[0]  # (1, 16, V)
            torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_eval_equals_training_without_capacity(routing):
    """Reference: eval output == training-mode output of the same weights with unlimited capacity (dropout 0)."""
    model = moe_decoder(routing)
    unlimited = moe_decoder(routing, capacity_factor=0.0).train()
    unlimited.load_state_dict(model.state_dict())
    idx, domains = tokens(4, 16, seed=1), domains_of(routing, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, domains=domains)[0], unlimited(idx, domains=domains)[0],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_kv_cached_generation_equals_uncached(routing):
    model = moe_decoder(routing)
    prompt, domains = tokens(3, 5, seed=2), domains_of(routing, 3)
    new = 12
    cached = model.generate(prompt, max_new_tokens=new, temperature=0, domains=domains)
    seq = prompt
    with torch.no_grad():
        for _ in range(new):  # no cache: rerun the whole sequence every step
            seq = torch.cat([seq, model(seq, domains=domains)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(cached, seq)
        # the logits themselves, not only their argmax: one token at a time through the cache vs one full pass
        cache = KVCache(model.cfg, batch_size=3, max_len=seq.shape[1])
        stepped = [model(seq[:, t:t + 1], domains=domains, kv_cache=cache, start_pos=t)[0] for t in range(seq.shape[1])]
        torch.testing.assert_close(torch.cat(stepped, dim=1), model(seq, domains=domains)[0], atol=1e-5, rtol=0)
    for i in range(3):  # and a row generated alone is the row generated in the batch
        alone = model.generate(prompt[i:i + 1], max_new_tokens=new, temperature=0,
                               domains=None if domains is None else domains[i:i + 1])
        assert torch.equal(alone[0], cached[i])


@pytest.mark.parametrize("routing,k", [("top1", 1), ("topk", 2)])
def test_training_mode_still_drops_over_capacity(routing, k):
    """Same input, same weights: training drops the overflow (output exactly 0 there), eval keeps every token."""
    E, d, N = 4, 8, 16
    moe = MoE(d, 16, n_experts=E, routing=routing, top_k=k, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, d) * 5.0)
    x = torch.eye(E, d)[:1].repeat(N, 1).view(1, N, d)  # every token prefers expert 0 ...
    x[0, :, 1] = 0.5  # ... and expert 1 second
    capacity = math.ceil(1.0 * N * k / E)
    assert moe.training  # a fresh module trains
    out_train, stats_train = moe(x)
    assert stats_train["dropped"].item() == N * k - capacity * k > 0
    assert (out_train[0, capacity:] == 0).all()
    moe.eval()
    out_eval, stats_eval = moe(x)
    assert stats_eval["dropped"].item() == 0
    assert (out_eval[0].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out_eval[0, :capacity], out_train[0, :capacity], atol=0, rtol=0)  # kept tokens agree
    torch.testing.assert_close(out_eval[0, capacity:], out_eval[0, :1].expand(N - capacity, d), atol=1e-6, rtol=0)
    assert torch.equal(stats_eval["load"], stats_train["load"])  # load counts choices, not what was kept


@pytest.mark.parametrize("routing", ["top1", "topk"])
def test_decoder_drops_in_training_and_not_in_eval(routing):
    model = moe_decoder(routing)
    idx, targets = tokens(4, 16), tokens(4, 16, seed=3)
    model.train()
    logits_train, _, aux_train = model(idx, targets)
    assert (aux_train["dropped_tokens"] > 0).all()  # capacity 0.5: half the assignments cannot fit
    model.eval()
    with torch.no_grad():
        logits_eval, _, aux_eval = model(idx, targets)
    assert (aux_eval["dropped_tokens"] == 0).all()
    assert not torch.allclose(logits_train, logits_eval, atol=1e-3)  # the drops were real
