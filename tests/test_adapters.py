"""Adapter tests: LoRA merged vs unmerged and vs peft, prefix tuning vs a pre-filled KV cache and vs real tokens,
prompt tuning vs the plain model on real tokens; each also checks that only the adapter trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fm.models import Decoder, KVCache, ModelConfig
from fm.models.adapters import LoRALinear, PrefixTuning, PromptTuning, apply_lora, lora_state_dict, merge_lora


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=32), **overrides})


def tokens(B=2, T=12, vocab=64, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def base_model(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny(**overrides)).eval()


def train_steps(model: nn.Module, steps=3, seed=1) -> dict[str, torch.Tensor]:
    """A few AdamW steps on the trainable parameters; returns the frozen ones as they were before."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        idx = tokens(seed=seed + step)
        _, loss, _ = model(idx, idx.roll(-1, dims=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return frozen


def assert_frozen_untouched(model: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert frozen and all(torch.equal(params[n], w) for n, w in frozen.items())  # bitwise
    assert all(params[n].grad is None for n in frozen)


# ---------------------------------------------------------------- LoRA


def test_lora_starts_as_the_base_model_and_counts_its_parameters():
    model = base_model(n_kv_head=2)
    idx = tokens()
    expected, _, _ = model(idx)
    apply_lora(model, targets=("wq", "wv"), rank=4, alpha=8)
    torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=0)  # B = 0: exactly the base
    cfg, r = model.cfg, 4
    per_layer = r * (cfg.d_model + cfg.n_head * cfg.head_dim) + r * (cfg.d_model + cfg.n_kv_head * cfg.head_dim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == cfg.n_layer * per_layer == 2 * (4 * 64 + 4 * 48)
    assert len(lora_state_dict(model)) == 2 * cfg.n_layer * 2  # A and B of wq and wv per layer


def test_lora_trains_only_adapters_and_merged_equals_unmerged():
    model = apply_lora(base_model(), targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), rank=4, alpha=8)
    frozen = train_steps(model)
    assert_frozen_untouched(model, frozen)
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))  # the adapters moved

    idx = tokens(seed=7)
    with torch.no_grad():
        unmerged, _, _ = model(idx)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        merged, _, _ = model(idx)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-6)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    torch.testing.assert_close(model(idx)[0], unmerged, rtol=0, atol=1e-6)

    # merge_lora gives back a plain Decoder: same keys as a fresh one, loads strictly, same outputs
    plain = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    fresh = Decoder(plain.cfg).eval()
    assert plain.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fresh(idx)[0], unmerged, rtol=0, atol=1e-6)


def test_lora_dropout_acts_on_the_branch_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6, bias=False), rank=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same draw the layer made
    torch.testing.assert_close(y, x @ layer.base.weight.T + dropped @ layer.lora_A.T @ layer.lora_B.T * 2.0)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + layer.delta_weight()).T)


def test_lora_refuses_a_head_tied_to_the_embedding():
    with pytest.raises(ValueError, match="tied"):
        apply_lora(base_model(), targets=("lm_head",))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(base_model(), targets=("q_proj",))


class TwoProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 12, bias=False)
        self.wv = nn.Linear(16, 8, bias=True)

    def forward(self, x):
        return torch.cat((self.wq(x), self.wv(x)), dim=-1)  # (B, 20)


def test_lora_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = TwoProjections()
    theirs = copy.deepcopy(ours)
    apply_lora(ours, targets=("wq", "wv"), rank=4, alpha=12)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                          target_modules=["wq", "wv"]), theirs)
    for name in ("wq", "wv"):
        mine, peft_layer = getattr(ours, name), getattr(theirs, name)
        assert mine.scaling == peft_layer.scaling["default"] == 3.0
        with torch.no_grad():
            nn.init.normal_(mine.lora_B)  # both start with B = 0; give the branch something to do
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)  # (r, in)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)  # (out, r)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    # merged weights agree too
    for name in ("wq", "wv"):
        getattr(ours, name).merge()
        getattr(theirs, name).merge()
        torch.testing.assert_close(getattr(ours, name).base.weight, getattr(theirs, name).base_layer.weight,
                                   rtol=0, atol=1e-6)
    # the same init family: kaiming-uniform(a=sqrt(5)) bound = 1/sqrt(in_features)
    assert ours.wq.lora_A.abs().max() <= 1 / 16 ** 0.5


# ---------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}])
def test_prefix_equals_a_prefilled_kv_cache(overrides):
    model = base_model(**overrides)
    tuned = PrefixTuning(model, n_prefix=5, init_std=0.5)
    idx = tokens()
    cache = KVCache(model.cfg, 2)  # the same keys/values written by hand at positions 0..4
    cache.k[:, :, :, :5] = tuned.prefix_k.detach()[:, None]
    cache.v[:, :, :, :5] = tuned.prefix_v.detach()[:, None]
    expected, _, _ = model(idx, kv_cache=cache, start_pos=5)
    logits, _, _ = tuned(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    # and greedy decoding from tuned.kv_cache continues the way the prefixed forward does
    cache = tuned.kv_cache(2)
    first, _, _ = model(idx, kv_cache=cache, start_pos=5)
    nxt = first[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    step, _, _ = model(nxt, kv_cache=cache, start_pos=5 + idx.shape[1])
    full, _, _ = tuned(torch.cat((idx, nxt), dim=1))
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=0, atol=1e-5)


def test_prefix_of_real_tokens_equals_feeding_those_tokens():
    """Independent of the cache path: a prefix set to the keys/values the model computes for 5 real tokens makes
    the real tokens' logits those of the plain model on [those 5 tokens + real tokens]."""
    model = base_model()
    context = tokens(B=1, T=5, seed=3)
    cache = KVCache(model.cfg, 1)
    with torch.no_grad():
        model(context, kv_cache=cache)
    tuned = PrefixTuning(model, n_prefix=5)
    with torch.no_grad():
        tuned.prefix_k.copy_(cache.k[:, 0, :, :5])  # (L, Hkv, P, D)
        tuned.prefix_v.copy_(cache.v[:, 0, :, :5])
    idx = tokens(B=2)
    full, _, _ = model(torch.cat((context.expand(2, -1), idx), dim=1))  # (B, 5 + T, V)
    torch.testing.assert_close(tuned(idx)[0], full[:, 5:], rtol=0, atol=1e-5)


def test_prefix_trains_only_the_prefix():
    tuned = PrefixTuning(base_model(), n_prefix=4)
    before = tuned.prefix_k.detach().clone()
    frozen = train_steps(tuned)
    assert_frozen_untouched(tuned, frozen)
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == {"prefix_k", "prefix_v"}
    assert not torch.equal(tuned.prefix_k, before)
    with pytest.raises(ValueError, match="dense attention"):
        PrefixTuning(base_model(attention="local", attn_window=4), n_prefix=4)


# ---------------------------------------------------------------- prompt tuning


def test_prompt_from_real_token_embeddings_equals_feeding_those_tokens():
    model = base_model()
    init_ids = tokens(B=1, T=6, seed=5)[0]  # (P,)
    tuned = PromptTuning(model, n_virtual=6, init_ids=init_ids)
    idx = tokens()
    targets = idx.roll(-1, dims=1)
    logits, loss, _ = tuned(idx, targets)
    full_idx = torch.cat((init_ids.expand(2, -1), idx), dim=1)  # (B, P + T)
    full_targets = torch.cat((torch.full((2, 6), -100), targets), dim=1)
    expected, expected_loss, _ = model(full_idx, full_targets)
    assert logits.shape == (2, 12, 64)
    torch.testing.assert_close(logits, expected[:, 6:], rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)


def test_prompt_on_hash_moe_and_trains_only_the_prompt():
    model = base_model(moe_layers="all", n_experts=2, moe_routing="hash")
    tuned = PromptTuning(model, n_virtual=3)
    before = tuned.prompt.detach().clone()
    frozen = train_steps(tuned)
    assert_frozen_untouched(tuned, frozen)
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt"]
    assert not torch.equal(tuned.prompt, before)
