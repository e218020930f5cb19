"""Sequence packing (Decoder.forward's doc_ids): every packed example gets the logits, loss and gradients it
gets alone, for the plain decoder, LoRA, prefix and prompt tuning and MoE; doc_ids=None is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fm.models import Decoder, KVCache, ModelConfig
from fm.models.adapters import PrefixTuning, PromptTuning, apply_lora
from fm.models.decoder import apply_rope, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ATOL = 1e-5
PAD = 0  # pad token id


def tiny(**overrides) -> ModelConfig:
    # init_std 0.3 (not 0.02) so attention is far from uniform: a wrong mask or position moves logits by >> ATOL
    return ModelConfig(**{**dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                 init_std=0.3), **overrides})


def base_model(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny(**overrides)).eval()


def examples(lengths, seed=0, vocab=64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def pack(exs, n_pad=0, ids=None):
    """One packed row: idx (T,), doc_ids (T,), slices of the examples. Pad is a document of its own.

    ids: the doc id of each example (default 0, 1, 2, ...); a value may repeat, runs are what count."""
    ids = list(range(len(exs))) if ids is None else ids
    idx = torch.cat([*exs, torch.full((n_pad,), PAD)])
    doc = torch.cat([torch.full((len(e),), i) for e, i in zip(exs, ids)] + [torch.full((n_pad,), max(ids) + 1)])
    starts = torch.tensor([0] + [len(e) for e in exs]).cumsum(0).tolist()
    return idx, doc, [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def next_token_targets(ex: torch.Tensor) -> torch.Tensor:
    return torch.cat((ex[1:], torch.tensor([-100])))  # the last token predicts nothing (it would cross a boundary)


def packed_targets(exs, n_pad) -> torch.Tensor:
    return torch.cat([next_token_targets(e) for e in exs] + [torch.full((n_pad,), -100)])


LENGTHS, N_PAD = (5, 7, 4), 3  # T = 19
DOC_IDS = [1, 0, 1]  # the third example reuses the first's id: a document is a run, not a value


def assert_each_example_as_alone(fn, exs, n_pad=N_PAD):
    """fn(idx (B, T), doc_ids or None) -> logits; the packed row's logits of each example == that example alone."""
    idx, doc, slices = pack(exs, n_pad, DOC_IDS)
    with torch.no_grad():
        packed = fn(idx[None], doc[None])[0]  # (T, V)
        unpacked = fn(idx[None], None)[0]
        for ex, s in zip(exs, slices):
            alone = fn(ex[None], None)[0]  # (n, V)
            torch.testing.assert_close(packed[s], alone, rtol=0, atol=ATOL)
    # the test can fail: without doc_ids the later examples see the earlier ones and their logits move
    assert (unpacked[slices[1]] - packed[slices[1]]).abs().max() > 1e-2


# ---------------------------------------------------------------- logits as alone


def test_apply_rope_per_row_tables_equal_the_shared_table_row_by_row():
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H, D)
    cos, sin = rope_tables(16, D, 10000.0)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 0, 1, 9, 2]])  # (B, T)
    out = apply_rope(x, cos[positions], sin[positions])  # (B, T, D) tables
    for b in range(B):
        for t in range(T):
            p = positions[b, t]
            expected = apply_rope(x[b:b + 1, t:t + 1], cos[p:p + 1], sin[p:p + 1])  # (T, D) path
            assert torch.equal(out[b, t], expected[0, 0])
    assert not torch.equal(out[1], apply_rope(x[1:], cos[:T], sin[:T])[0])  # row 1's positions do matter


def test_packed_row_equals_each_example_alone():
    model = base_model()
    assert_each_example_as_alone(lambda idx, doc: model(idx, doc_ids=doc)[0], examples(LENGTHS))


def test_packed_row_with_lora_equals_each_example_alone():
    model = apply_lora(base_model(), targets=("wq", "wv", "w_up"), rank=4, alpha=8)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.3)  # B = 0 would make it the base model
    assert_each_example_as_alone(lambda idx, doc: model(idx, doc_ids=doc)[0], examples(LENGTHS, seed=1))


def test_packed_row_with_prompt_tuning_equals_each_example_alone():
    torch.manual_seed(2)
    tuned = PromptTuning(base_model(), n_virtual=4)
    with torch.no_grad():
        tuned.prompt.normal_(std=1.0)
    assert_each_example_as_alone(lambda idx, doc: tuned(idx, doc_ids=doc)[0], examples(LENGTHS, seed=2))


def test_packed_row_with_prefix_tuning_equals_each_example_alone():
    torch.manual_seed(3)
    tuned = PrefixTuning(base_model(), n_prefix=4, init_std=1.0)
    assert_each_example_as_alone(lambda idx, doc: tuned(idx, doc_ids=doc)[0], examples(LENGTHS, seed=3))


@pytest.mark.parametrize("routing", ["topk", "hash"])
def test_packed_row_with_moe_equals_each_example_alone(routing):
    model = base_model(moe_layers="all", n_experts=4, moe_routing=routing)  # eval: no capacity, per-token routing
    assert_each_example_as_alone(lambda idx, doc: model(idx, doc_ids=doc)[0], examples(LENGTHS, seed=4))


def test_shared_leading_tokens_are_seen_by_every_example_at_their_own_positions():
    """doc_ids < 0 on real tokens: each example's logits are those of [shared tokens + example] alone."""
    model = base_model()
    shared = examples((3,), seed=5)[0]
    exs = examples(LENGTHS, seed=6)
    idx, doc, slices = pack(exs, N_PAD, DOC_IDS)
    idx, doc = torch.cat((shared, idx)), torch.cat((torch.full((3,), -1), doc))
    with torch.no_grad():
        packed = model(idx[None], doc_ids=doc[None])[0][0]  # (3 + T, V)
        torch.testing.assert_close(packed[:3], model(shared[None])[0][0], rtol=0, atol=ATOL)
        for ex, s in zip(exs, slices):
            alone = model(torch.cat((shared, ex))[None])[0][0, 3:]
            torch.testing.assert_close(packed[3 + s.start:3 + s.stop], alone, rtol=0, atol=ATOL)


def captured_rope_and_mask(model: Decoder, call):
    """The rope tables and attention mask layer 0's attention receives during call()."""
    seen = {}
    hook = model.layers[0].attn.register_forward_pre_hook(lambda m, args: seen.update(rope=args[1], mask=args[2]))
    try:
        with torch.no_grad():
            call()
    finally:
        hook.remove()
    return seen["rope"], seen["mask"]


def test_positions_restart_per_document_and_the_mask_is_block_causal():
    model = base_model()
    doc = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 0, 2]])  # 2 shared, then runs of 3, 2, 1, 1
    (cos, sin), mask = captured_rope_and_mask(model, lambda: model(torch.ones_like(doc), doc_ids=doc))
    positions = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 2, 2]])
    assert torch.equal(cos, model.rope_cos[positions]) and torch.equal(sin, model.rope_sin[positions])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 1, 0],  # id 0 again, but a new run: a new document
                             [1, 1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 9, 9) and torch.equal(mask[0, 0], expected)

    tuned = PrefixTuning(model, n_prefix=4)  # positions from 4; the 4 prefix key columns visible to all
    doc = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 3]])
    (cos, _), mask = captured_rope_and_mask(model, lambda: tuned(torch.ones_like(doc), doc_ids=doc))
    assert torch.equal(cos, model.rope_cos[torch.tensor([[4, 5, 4, 5, 6], [4, 5, 6, 7, 8]])])
    block = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert mask.shape == (2, 1, 5, 9)
    assert torch.equal(mask[0, 0], torch.cat((torch.ones(5, 4), block), dim=1).bool())
    assert torch.equal(mask[1, 0], torch.cat((torch.ones(5, 4), torch.ones(5, 5).tril()), dim=1).bool())


@pytest.mark.parametrize("adapter", ["none", "prompt", "prefix"])
def test_batch_of_two_packed_rows(adapter):
    model = base_model()
    fn = lambda idx, doc: model(idx, doc_ids=doc)[0]  # noqa: E731
    if adapter == "prompt":
        torch.manual_seed(7)
        tuned = PromptTuning(model, n_virtual=3)
        with torch.no_grad():
            tuned.prompt.normal_(std=1.0)
        fn = lambda idx, doc: tuned(idx, doc_ids=doc)[0]  # noqa: E731
    elif adapter == "prefix":
        torch.manual_seed(7)
        tuned = PrefixTuning(model, n_prefix=3, init_std=1.0)
        fn = lambda idx, doc: tuned(idx, doc_ids=doc)[0]  # noqa: E731
    rows = [examples(LENGTHS, seed=8), examples((8, 6, 5), seed=9)]  # 5 + 7 + 4 + 3 pad, 8 + 6 + 5: both T = 19
    packed = [pack(rows[0], N_PAD), pack(rows[1], 0)]
    idx = torch.stack([p[0] for p in packed])  # (2, T)
    doc = torch.stack([p[1] for p in packed])
    with torch.no_grad():
        logits = fn(idx, doc)  # (2, T, V)
        for b, (exs, (_, _, slices)) in enumerate(zip(rows, packed)):
            for ex, s in zip(exs, slices):
                torch.testing.assert_close(logits[b, s], fn(ex[None], None)[0], rtol=0, atol=ATOL)
            torch.testing.assert_close(logits[b], fn(idx[b:b + 1], doc[b:b + 1])[0], rtol=0, atol=ATOL)  # rows apart


@pytest.mark.parametrize("adapter", ["none", "prompt", "prefix"])
def test_one_document_per_row_equals_no_doc_ids(adapter):
    model = base_model()
    fn = lambda idx, doc: model(idx, doc_ids=doc)[0]  # noqa: E731
    if adapter == "prompt":
        tuned = PromptTuning(model, n_virtual=3)
        fn = lambda idx, doc: tuned(idx, doc_ids=doc)[0]  # noqa: E731
    elif adapter == "prefix":
        tuned = PrefixTuning(model, n_prefix=3, init_std=1.0)
        fn = lambda idx, doc: tuned(idx, doc_ids=doc)[0]  # noqa: E731
    idx = torch.stack(examples((16, 16), seed=10))  # (2, 16)
    with torch.no_grad():
        expected = fn(idx, None)
        torch.testing.assert_close(fn(idx, torch.full_like(idx, 4)), expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(fn(idx, torch.zeros_like(idx)), expected, rtol=0, atol=ATOL)
        # and a row split in two is not one document
        split = torch.cat((torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)), dim=1)
        assert (fn(idx, split)[:, 8:] - expected[:, 8:]).abs().max() > 1e-2


# ---------------------------------------------------------------- loss and gradients


def per_example_reference(fn, exs):
    """sum over examples of (token count * mean loss alone) and the total count: their ratio is the packed loss."""
    total, count = 0.0, 0
    for ex in exs:
        n = int((next_token_targets(ex) != -100).sum())
        total = total + n * fn(ex[None], next_token_targets(ex)[None], None)
        count += n
    return total, count


def test_packed_loss_is_the_token_weighted_mean_of_the_examples_losses():
    model = base_model()
    fn = lambda idx, targets, doc: model(idx, targets, doc_ids=doc)[1]  # noqa: E731
    exs = examples(LENGTHS, seed=11)
    idx, doc, _ = pack(exs, N_PAD, DOC_IDS)
    targets = packed_targets(exs, N_PAD)
    with torch.no_grad():
        loss = fn(idx[None], targets[None], doc[None])
        total, count = per_example_reference(fn, exs)
        unpacked = fn(idx[None], targets[None], None)
    assert count == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(loss, total / count, rtol=0, atol=ATOL)
    assert abs(unpacked - loss) > 1e-3  # without doc_ids it is another number


def lora_model():
    model = apply_lora(base_model(), targets=("wq", "wv"), rank=4, alpha=8)
    torch.manual_seed(12)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.3)  # so that lora_A gets a gradient too
    return model


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_gradients_reach_the_adapter_as_from_each_example_alone(adapter):
    if adapter == "lora":
        model = lora_model()
    elif adapter == "prompt":
        torch.manual_seed(13)
        model = PromptTuning(base_model(), n_virtual=3)
        with torch.no_grad():
            model.prompt.normal_(std=1.0)
    else:
        torch.manual_seed(13)
        model = PrefixTuning(base_model(), n_prefix=3, init_std=1.0)
    model.train()  # dropout is 0: train mode changes nothing else here
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    fn = lambda idx, targets, doc: model(idx, targets, doc_ids=doc)[1]  # noqa: E731

    exs = examples(LENGTHS, seed=14)
    idx, doc, _ = pack(exs, N_PAD, DOC_IDS)
    fn(idx[None], packed_targets(exs, N_PAD)[None], doc[None]).backward()
    packed = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)
    total, count = per_example_reference(fn, exs)
    (total / count).backward()
    for n, p in trainable.items():
        assert packed[n].abs().sum() > 0, n
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen


# ---------------------------------------------------------------- refusals


def test_packing_refuses_sparse_attention_non_causal_models_and_a_kv_cache():
    idx = torch.stack(examples((8,), seed=15))
    doc = torch.tensor([[0] * 4 + [1] * 4])
    with pytest.raises(ValueError, match="dense attention"):
        base_model(attention="local", attn_window=4)(idx, doc_ids=doc)
    with pytest.raises(ValueError, match="causal"):
        base_model(causal=False)(idx, doc_ids=doc)
    model = base_model()
    with pytest.raises(ValueError, match="generation"):
        model(idx, kv_cache=KVCache(model.cfg, 1), doc_ids=doc)
    with pytest.raises(ValueError, match="generation"):  # the prefix tuner's own generation cache too
        model(idx, kv_cache=PrefixTuning(model, n_prefix=2).kv_cache(1), start_pos=2, doc_ids=doc)
    with pytest.raises(ValueError, match="leading run"):
        model(idx, doc_ids=torch.tensor([[0] * 4 + [-1] * 4]))
    with pytest.raises(ValueError, match="shape"):
        model(idx, doc_ids=doc[:, :6])
    # and generation itself is untouched by the new argument
    out = model.generate(idx[:, :4], max_new_tokens=3, temperature=0)
    logits, _, _ = model(out[:, :-1])
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))
