"""Multiple choice by log-likelihood (fm/eval/choice.py): continuation log-probs against a manual full forward,
independence of batch size, left truncation, adapters, and multiple_choice on a model whose answer is known.

    pytest tests/test_choice.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers, trainers

from fm.data.chat import ChatTemplate
from fm.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, new_tokenizer
from fm.eval.choice import continuation_logprobs, model_max_len, multiple_choice
from fm.models import Decoder, ModelConfig
from fm.models.adapters import PrefixTuning, PromptTuning

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=VOCAB, seq_len=32, n_layer=2, n_head=4, d_model=32), **overrides})


def base_model(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(tiny(**overrides)).eval()


def random_pairs(n=10, seed=0, max_ctx=12, max_cont=6) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, max_ctx))],
             [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_cont))]) for _ in range(n)]


def manual(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward of the whole sequence; sum the log-probs at the continuation's positions."""
    ids = torch.tensor([context + continuation])  # (1, S)
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0][0].float(), dim=-1)  # (S, V)
    n = len(context)
    preds = logp[n - 1:-1]  # (len(continuation), V): position t predicts token t + 1
    cont = torch.tensor(continuation)
    return preds[torch.arange(len(cont)), cont].sum().item(), bool((preds.argmax(-1) == cont).all())


def assert_matches(got, expected, atol=1e-5):
    assert len(got) == len(expected)
    for (lp, greedy), (lp_e, greedy_e) in zip(got, expected):
        assert lp == pytest.approx(lp_e, abs=atol)
        assert greedy == greedy_e


# ---------------------------------------------------------------- continuation_logprobs


def test_logprobs_equal_a_full_forward_of_each_pair_in_input_order():
    model = base_model()
    pairs = random_pairs(12)
    got = continuation_logprobs(model, pairs, max_len=32, batch_size=4)
    assert_matches(got, [manual(model, c, x) for c, x in pairs])
    assert len({round(lp, 4) for lp, _ in got}) == len(pairs)  # distinct, so a permuted return would fail


def test_is_greedy_is_true_exactly_when_every_continuation_token_is_the_argmax():
    model = base_model()
    context = [3, 14, 15, 9]
    greedy = model.generate(torch.tensor([context]), max_new_tokens=3, temperature=0)[0, len(context):].tolist()
    other = (greedy[-1] + 1) % VOCAB
    (lp_g, is_g), (lp_o, is_o), (_, is_first) = continuation_logprobs(
        model, [(context, greedy), (context, greedy[:-1] + [other]), (context, greedy[:1])], max_len=32)
    assert is_g and is_first and not is_o
    assert lp_g > lp_o


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}, {"moe_layers": "all", "moe_routing": "topk"},
                                       {"attention": "local", "attn_window": 4}])
def test_results_do_not_depend_on_batch_size(overrides):
    model = base_model(**overrides)
    pairs = random_pairs(20, seed=1, max_ctx=20, max_cont=8)
    one = continuation_logprobs(model, pairs, max_len=32, batch_size=1)
    for bs in (3, 64):
        other = continuation_logprobs(model, pairs, max_len=32, batch_size=bs)
        # Equal up to fp32 rounding: matmuls of another shape may sum in another order (~1e-7 relative).
        assert torch.allclose(torch.tensor([lp for lp, _ in other]), torch.tensor([lp for lp, _ in one]),
                              rtol=1e-6, atol=1e-6)
        assert [g for _, g in other] == [g for _, g in one]


def test_a_domain_routed_moe_scores_each_pair_with_its_own_domain():
    model = base_model(moe_layers="all", moe_routing="domain", n_experts=3, n_domains=3)
    pairs = random_pairs(9, seed=4)
    domains = [i % 3 for i in range(len(pairs))]
    got = continuation_logprobs(model, pairs, max_len=32, batch_size=4, domains=domains)
    for (lp, _), (context, continuation), dom in zip(got, pairs, domains):
        ids = torch.tensor([context + continuation])  # (1, S)
        with torch.no_grad():
            logp = F.log_softmax(model(ids, domains=torch.tensor([dom]))[0][0], dim=-1)  # (S, V)
        n = len(context)
        assert lp == pytest.approx(logp[n - 1:-1][torch.arange(len(continuation)), torch.tensor(continuation)].sum().item(), abs=1e-5)
    other = continuation_logprobs(model, pairs, max_len=32, batch_size=4, domains=[(d + 1) % 3 for d in domains])
    assert max(abs(a[0] - b[0]) for a, b in zip(got, other)) > 1e-3  # the domain picks the expert
    with pytest.raises(ValueError, match="domain routing needs domains"):
        continuation_logprobs(model, pairs, max_len=32)


def option_pairs(n_questions=6, n_options=4, seed=3) -> list[tuple[list[int], list[int]]]:
    """Multiple-choice pairs: each question's context with several continuations of different lengths."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_questions):
        context = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))]
        pairs += [(context, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))]) for _ in range(n_options)]
    rng.shuffle(pairs)  # a question's options need not be adjacent
    return pairs


@pytest.mark.parametrize("wrap", ["none", "prefix", "prompt", "moe"])
def test_options_of_one_context_are_packed_in_one_row_with_the_scores_of_separate_rows(wrap, monkeypatch):
    """The context is computed once per question, not once per option (fewer, shorter rows), and every option
    scores what a full forward of context + option gives, greedy flags included."""
    base = base_model(**({"moe_layers": "all", "moe_routing": "topk"} if wrap == "moe" else {}))
    torch.manual_seed(1)
    model = {"none": base, "moe": base, "prefix": PrefixTuning(base, n_prefix=4, init_std=1.0),
             "prompt": PromptTuning(base, n_virtual=4)}[wrap]
    pairs = option_pairs() + random_pairs(3, seed=9)  # and some pairs alone
    rows = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, idx, *a, **kw: rows.append(
        (idx.shape, kw.get("doc_ids") is not None)) or forward(self, idx, *a, **kw))
    got = continuation_logprobs(model, pairs, max_len=model_max_len(model), batch_size=2)
    monkeypatch.undo()
    assert_matches(got, [manual(model, c, x) for c, x in pairs], atol=1e-4)
    assert sum(shape[0] for shape, packed in rows if packed) == 6  # one row per question
    assert sum(shape[0] for shape, packed in rows if not packed) == 3
    # a question whose options do not fit max_len together is scored one option per row
    long = [(list(range(1, 20)), [5, 6, 7, 8]) for _ in range(4)]
    assert_matches(continuation_logprobs(base, long, max_len=32), [manual(base, c, x) for c, x in long], atol=1e-4)


def test_pad_id_does_not_change_the_scores():
    model = base_model()
    pairs = random_pairs(8, seed=2)
    a = continuation_logprobs(model, pairs, max_len=32, batch_size=8, pad_id=1)
    b = continuation_logprobs(model, pairs, max_len=32, batch_size=8, pad_id=VOCAB - 1)
    assert_matches(a, b, atol=1e-6)


def test_long_context_is_truncated_on_the_left_and_the_continuation_kept():
    model = base_model()
    rng = random.Random(3)
    context = [rng.randrange(VOCAB) for _ in range(40)]
    continuation = [rng.randrange(VOCAB) for _ in range(5)]
    max_len = 16
    (lp, greedy), = continuation_logprobs(model, [(context, continuation)], max_len=max_len)
    kept = context[-(max_len - len(continuation)):]  # 11 context tokens + 5 = 16
    (lp_direct, greedy_direct), = continuation_logprobs(model, [(kept, continuation)], max_len=max_len)
    assert (lp, greedy) == (lp_direct, greedy_direct)
    assert lp == pytest.approx(manual(model, kept, continuation)[0], abs=1e-5)
    # More room keeps more context, and that changes the score: the cut above really happened.
    (lp_wide, _), = continuation_logprobs(model, [(context[-20:], continuation)], max_len=32)
    assert abs(lp_wide - lp) > 1e-4


def test_continuation_may_fill_all_but_one_position_and_no_more():
    model = base_model()
    context, max_len = list(range(10)), 16
    (lp, _), = continuation_logprobs(model, [(context, list(range(20, 35)))], max_len=max_len)  # 15 = max_len - 1
    assert lp == pytest.approx(manual(model, context[-1:], list(range(20, 35)))[0], abs=1e-5)
    with pytest.raises(ValueError, match="does not fit max_len=16"):
        continuation_logprobs(model, [(context, list(range(20, 36)))], max_len=max_len)


@pytest.mark.parametrize("pair", [([], [1, 2]), ([1, 2], [])])
def test_empty_context_or_continuation_is_refused(pair):
    with pytest.raises(ValueError, match="non-empty"):
        continuation_logprobs(base_model(), [pair], max_len=32)


def test_scoring_runs_in_eval_mode_and_restores_the_training_flag():
    model = base_model(dropout=0.5).train()
    pairs = random_pairs(4, seed=4)
    got = continuation_logprobs(model, pairs, max_len=32)
    assert model.training  # put back as it was
    model.eval()
    assert_matches(got, [manual(model, c, x) for c, x in pairs])  # no dropout in the scores


def test_a_bidirectional_model_is_refused():
    with pytest.raises(ValueError, match="causal"):
        continuation_logprobs(base_model(causal=False), random_pairs(1), max_len=32)


# ---------------------------------------------------------------- adapters


def test_model_max_len_leaves_room_for_an_adapters_positions():
    model = base_model()
    assert model_max_len(model) == 32
    assert model_max_len(PrefixTuning(model, n_prefix=5)) == 27
    assert model_max_len(PromptTuning(model, n_virtual=7)) == 25
    with pytest.raises(TypeError):
        model_max_len(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("wrap", ["prefix", "prompt"])
def test_adapter_wrapped_model_scores_through_its_own_forward(wrap):
    base = base_model()
    torch.manual_seed(1)
    if wrap == "prefix":
        model = PrefixTuning(base, n_prefix=6, init_std=1.0)  # large, so the prefix clearly moves the scores
    else:
        model = PromptTuning(base, n_virtual=6)
        with torch.no_grad():
            model.prompt.normal_()
    max_len = model_max_len(model)
    pairs = random_pairs(10, seed=5) + [(list(range(40)), [1, 2, 3])]  # the last one is truncated to max_len
    got = continuation_logprobs(model, pairs, max_len=max_len, batch_size=3)
    expected = [manual(model, c[-(max_len - len(x)):], x) for c, x in pairs]
    assert_matches(got, expected)
    plain = continuation_logprobs(base, pairs[:-1], max_len=32)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, plain)) > 1e-2  # the adapter matters


# ---------------------------------------------------------------- multiple_choice


@pytest.fixture(scope="module")
def chat() -> ChatTemplate:
    """A real byte-level BPE with fm's special tokens, trained so that "ab", "the" and "月" are one token each."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Each word also alone: in running text the BPE would merge it with its leading space.
    tok.train_from_iterator(["ab", "the", "月", "ab the 月 cat dog"] * 50, trainer=trainer)
    tok.encode_special_tokens = True  # as open_tokenizer sets it
    assert tok.token_to_id("<|pad|>") == SPECIAL_IDS["<|pad|>"]
    return ChatTemplate(tok)


def unigram_model(vocab_size: int, logits: torch.Tensor, seq_len: int = 64) -> Decoder:
    """A Decoder whose next-token distribution is softmax(logits) at every position, whatever came before.

    Every token embeds to the same vector (ones) and the blocks' output projections are zero, so the
    residual stream is ones everywhere; the final RMSNorm keeps it ones; lm_head's first column is
    logits and the rest zero, so the head gives logits at every position.
    """
    torch.manual_seed(0)
    model = Decoder(tiny(vocab_size=vocab_size, seq_len=seq_len, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.tok_emb.weight.fill_(1.0)
        for block in model.layers:
            block.attn.wo.weight.zero_()
            block.mlp.w_down.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model


def expected_logprob(chat: ChatTemplate, logp: torch.Tensor, option: str) -> float:
    return sum(logp[t].item() for t in chat.encode_response(option))


def test_multiple_choice_picks_the_likeliest_option(chat):
    V = chat.tokenizer.get_vocab_size()
    cat, dog = chat.tokenizer.encode(" cat").ids, chat.tokenizer.encode(" dog").ids
    logits = torch.zeros(V)
    logits[cat] = 6.0  # the model loves " cat", and dislikes " dog"
    logits[dog] = -6.0
    model = unigram_model(V, logits)
    items = [
        {"prompt": "pick one", "options": [" dog", " cat"], "answer_index": 1},
        {"prompt": "pick again", "options": [" cat", " dog", "ab"], "answer_index": 0},
        {"prompt": "and again", "options": [" dog", "the", " cat", "ab"], "answer_index": 0},  # wrong on purpose
    ]
    res = multiple_choice(model, chat, items, max_len=model_max_len(model), batch_size=2)
    logp = F.log_softmax(logits, dim=-1)
    for item, lps in zip(items, res["logprobs"]):
        assert lps == pytest.approx([expected_logprob(chat, logp, o) for o in item["options"]], abs=1e-4)
    assert res["predictions"] == [1, 0, 2]
    assert res["n"] == 3
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["accuracy_norm"] == pytest.approx(2 / 3)
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_ties_go_to_the_lowest_index_and_norm_divides_by_utf8_bytes(chat):
    tok = chat.tokenizer
    for word in ("ab", "the", "月"):
        assert len(tok.encode(word).ids) == 1, word  # the fixture's merges, which this test relies on
    V = tok.get_vocab_size()
    model = unigram_model(V, torch.zeros(V))  # uniform: an option's log-likelihood is -(tokens + 1) log V
    items = [
        # One token each, so equal log-likelihood: the raw prediction is the lowest index, whatever it holds.
        {"prompt": "q", "options": ["ab", "the"], "answer_index": 0},
        {"prompt": "q", "options": ["the", "ab"], "answer_index": 0},
        # Per byte, the longer option costs less: "the" (3 bytes) over "ab" (2); "月" is 1 character but 3
        # bytes, so by bytes it beats "ab" (2 bytes), where by characters "ab" (2 characters) would win.
        {"prompt": "q", "options": ["ab", "月"], "answer_index": 1},
        {"prompt": "q", "options": ["ab", "ab"], "answer_index": 1},  # identical options: index 0
    ]
    res = multiple_choice(model, chat, items, max_len=64)
    for lps in res["logprobs"]:
        assert lps[0] == lps[1] == pytest.approx(-2 * math.log(V), abs=1e-4)
    assert res["predictions"] == [0, 0, 0, 0]
    assert res["accuracy"] == pytest.approx(2 / 4)  # items 0 and 1
    # norm predictions: [1 ("the"), 0 ("the"), 1 ("月"), 0 (tie)] -> right on items 1 and 2
    assert res["accuracy_norm"] == pytest.approx(2 / 4)
    assert res["chance"] == pytest.approx(0.5)


def test_accuracy_norm_is_reported_separately_from_accuracy(chat):
    V = chat.tokenizer.get_vocab_size()
    model = unigram_model(V, torch.zeros(V))
    res = multiple_choice(model, chat, [{"prompt": "q", "options": ["ab", "the"], "answer_index": 1}], max_len=64)
    assert (res["accuracy"], res["accuracy_norm"]) == (0.0, 1.0)


def test_multiple_choice_on_a_wrapped_model_equals_its_continuation_logprobs(chat):
    V = chat.tokenizer.get_vocab_size()
    torch.manual_seed(0)
    model = PrefixTuning(Decoder(tiny(vocab_size=V, seq_len=64)).eval(), n_prefix=8, init_std=1.0)
    items = [{"prompt": "the cat", "options": [" dog", " cat", "月"], "answer_index": 1},
             {"prompt": "ab " * 40, "options": ["the", "ab"], "answer_index": 0}]  # a prompt longer than max_len
    max_len = model_max_len(model)
    res = multiple_choice(model, chat, items, max_len=max_len, batch_size=2)
    for item, lps, pred in zip(items, res["logprobs"], res["predictions"]):
        context = chat.encode_prompt(item["prompt"])
        expected = [manual(model, context[-(max_len - len(x)):], x)[0]
                    for x in map(chat.encode_response, item["options"])]
        assert lps == pytest.approx(expected, abs=1e-5)
        assert pred == max(range(len(expected)), key=expected.__getitem__)


@pytest.mark.parametrize("items, match", [
    ([], "no items"),
    ([{"prompt": "q", "options": None, "answer_index": None}], "no options"),
    ([{"prompt": "q", "options": ["a", "b"], "answer_index": 2}], "answer_index 2"),
    ([{"prompt": "q", "options": ["a", ""], "answer_index": 0}], "empty option"),
])
def test_bad_items_are_refused(chat, items, match):
    V = chat.tokenizer.get_vocab_size()
    with pytest.raises(ValueError, match=match):
        multiple_choice(unigram_model(V, torch.zeros(V)), chat, items, max_len=64)
