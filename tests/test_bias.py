"""The bias probe (fm/eval/bias.py): the templates are minimal pairs, a pair's score against a manual forward,
independence of batch size, and the sign on a model made to prefer one pronoun.

    pytest tests/test_bias.py
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers, trainers

from fm.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, new_tokenizer
from fm.eval.bias import (AGE_WORDS, AXES, LANGS, OCCUPATIONS, PRONOUNS, bias_probe, differing_span, minimal_pairs,
                          summarize)
from fm.models import Decoder, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SLOT_WORDS = {"gender": PRONOUNS, "age": AGE_WORDS}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with fm's special tokens, trained on the probe's English sentences and on its Chinese
    characters one by one, so that the pronouns are one token each in a sentence (as he, she and 他 are in fm's
    real tokenizer): trained on whole Chinese sentences, BPE would merge 说他 into one token."""
    pairs = minimal_pairs()
    english = [s for p in pairs if p["lang"] == "en" for s in (p["a"], p["b"])]
    chinese_chars = sorted({c for p in pairs if p["lang"] == "zh" for c in p["a"] + p["b"]})
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(english * 2 + chinese_chars * 2, trainer=trainer)
    tok.encode_special_tokens = True  # as open_tokenizer sets it
    for word in (" he", " she", "他", "她"):
        assert len(tok.encode(word).ids) == 1, word
    assert tok.encode("她").ids[0] in tok.encode("护士说她今天很累。").ids
    return tok


@pytest.fixture(scope="module")
def model(tokenizer) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), seq_len=128, n_layer=2, n_head=4, d_model=32)
    return Decoder(cfg).eval()


# ---------------------------------------------------------------- templates


def test_templates_are_minimal_pairs():
    pairs = minimal_pairs()
    assert len({(p["a"], p["b"]) for p in pairs}) == len(pairs)  # no pair twice
    for p in pairs:
        word_a, word_b = SLOT_WORDS[p["axis"]][p["lang"]]
        if p["lang"] == "en":  # exactly one word differs, and it is the slot's
            a, b = re.findall(r"\w+|[^\w\s]", p["a"]), re.findall(r"\w+|[^\w\s]", p["b"])
            assert len(a) == len(b)
            assert [(x, y) for x, y in zip(a, b) if x != y] == [(word_a, word_b)]
        else:  # one contiguous character group differs, inside the slot's words
            prefix, len_a, len_b = differing_span(list(p["a"]), list(p["b"]))
            mid_a, mid_b = p["a"][prefix:prefix + len_a], p["b"][prefix:prefix + len_b]
            assert mid_a and mid_b and mid_a in word_a and mid_b in word_b
            assert p["a"].replace(word_a, word_b, 1) == p["b"]


def test_occupations_and_stereotypes_line_up_across_languages():
    for lang in LANGS:
        assert len(OCCUPATIONS[lang]) == 20
        assert len({occ for occ, _ in OCCUPATIONS[lang]}) == 20
        assert sum(s == "m" for _, s in OCCUPATIONS[lang]) == 10  # balanced: the stereotype effect compares halves
    assert [s for _, s in OCCUPATIONS["en"]] == [s for _, s in OCCUPATIONS["zh"]]


def test_differing_span():
    assert differing_span([1, 2, 3, 4], [1, 5, 6, 4]) == (1, 2, 2)
    assert differing_span([1, 2, 4], [1, 5, 6, 4]) == (1, 1, 2)
    assert differing_span([7, 7], [7, 7, 7]) == (2, 0, 1)  # prefix and suffix never overlap


# ---------------------------------------------------------------- scoring


def manual_logp(model, tokenizer, text: str, lang: str) -> float:
    """One unpadded forward of header + sentence; the sum of log p over the sentence's tokens."""
    ids = [SPECIAL_IDS["<|text|>"], SPECIAL_IDS[f"<|lang:{lang}|>"], *tokenizer.encode(text).ids]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)  # (S, V)
    targets = torch.tensor(ids[2:])
    return logp[1:-1][torch.arange(len(targets)), targets].sum().item()  # position t predicts token t + 1


def test_scores_match_a_manual_forward(model, tokenizer):
    res = bias_probe(model, tokenizer, max_len=128, batch_size=8)
    json.dumps(res)  # JSON-safe
    picked = [r for r in res["pairs"] if r["lang"] == "en"][:2] + [r for r in res["pairs"] if r["lang"] == "zh"][-2:]
    for r in picked:
        a, b = manual_logp(model, tokenizer, r["a"], r["lang"]), manual_logp(model, tokenizer, r["b"], r["lang"])
        # Sums of ~20 log-probs in fp32, ~150 nats for this untrained model: 1e-5 is its last bit or two.
        assert r["logp_a"] == pytest.approx(a, rel=1e-6, abs=1e-5)
        assert r["logp_b"] == pytest.approx(b, rel=1e-6, abs=1e-5)
        assert r["gap"] == pytest.approx(a - b, abs=1e-4)
    # The summary is the pairs' figures.
    gender_zh = [r["gap"] for r in res["pairs"] if r["axis"] == "gender" and r["lang"] == "zh"]
    f = res["axes"]["gender"]["zh"]
    assert f["n_pairs"] == 80 and f["n_items"] == 20
    assert f["mean_gap"] == pytest.approx(np.mean(gender_zh))
    assert f["std_gap"] == pytest.approx(np.std(gender_zh, ddof=1))
    assert f["share_prefers_a"] == pytest.approx(np.mean(np.array(gender_zh) > 0))
    assert f["ci95"][0] <= f["mean_gap"] <= f["ci95"][1]
    assert f["aligned_share"] == 1.0  # he/she and 他/她 are one token each in this tokenizer


def test_results_do_not_depend_on_batch_size(model, tokenizer):
    runs = [bias_probe(model, tokenizer, max_len=128, batch_size=bs) for bs in (1, 4, 32)]
    # Equal up to fp32 rounding: matmuls of another shape may sum in another order, and a sentence's log p
    # (~150 nats here) is an fp32 sum whose last bit is ~1.5e-5.
    logps = [torch.tensor([[r["logp_a"], r["logp_b"]] for r in run["pairs"]]) for run in runs]
    gaps = [torch.tensor([r["gap"] for r in run["pairs"]]) for run in runs]
    for other_logp, other_gap in zip(logps[1:], gaps[1:]):
        assert torch.allclose(other_logp, logps[0], rtol=1e-6, atol=1e-5)
        assert torch.allclose(other_gap, gaps[0], rtol=0, atol=1e-4)
    for run in runs[1:]:
        for axis in AXES:
            for lang in LANGS:
                got, want = run["axes"][axis][lang], runs[0]["axes"][axis][lang]
                for key in ("mean_gap", "std_gap", "stereotype_effect"):
                    assert got[key] == pytest.approx(want[key], abs=1e-4)
                for key in ("ci95", "stereotype_ci95"):
                    assert got[key] == pytest.approx(want[key], abs=1e-4)
                for key in ("share_prefers_a", "share_stereotype", "aligned_share", "n_pairs"):
                    assert got[key] == want[key]


@pytest.mark.parametrize("favoured, sign", [(0, 1.0), (1, -1.0)])  # 0: he / 他, 1: she / 她
def test_a_model_biased_to_one_pronoun_shows_its_sign(model, tokenizer, favoured, sign):
    """A logit bias on the LM head's row of one pronoun (in both languages) makes every gender gap take its sign."""
    ids = [tokenizer.encode(w).ids[0] for w in ((" he", "他"), (" she", "她"))[favoured]]
    bias = torch.zeros(tokenizer.get_vocab_size())
    bias[ids] = 10.0
    plain = bias_probe(model, tokenizer, max_len=128, batch_size=32)
    handle = model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)  # (B, T, V) + (V,)
    try:
        biased = bias_probe(model, tokenizer, max_len=128, batch_size=32)
    finally:
        handle.remove()
    for lang in LANGS:
        f = biased["axes"]["gender"][lang]
        assert sign * f["mean_gap"] > 5
        assert f["share_prefers_a"] == (1.0 if sign > 0 else 0.0)
        assert sign * (f["mean_gap"] - plain["axes"]["gender"][lang]["mean_gap"]) > 5
    # No age sentence holds a pronoun: that axis moves only by the normalizer, far less.
    for lang in LANGS:
        moved = abs(biased["axes"]["age"][lang]["mean_gap"] - plain["axes"]["age"][lang]["mean_gap"])
        assert moved < 1.0


# ---------------------------------------------------------------- statistics


def test_stereotype_effect_ignores_a_preference_for_a_everywhere():
    """Gaps of 3 + 1 on items stereotyped A and 3 - 1 on those stereotyped B: a mean gap of 3 from an overall
    preference for A, and a stereotype effect of 2 (1 - (-1)) from the stereotype alone."""
    rows = [{"item": f"m{i}", "stereotype": "m", "a_is_stereotype": True, "gap": 4.0 + 0.1 * k, "aligned": True}
            for i in range(5) for k in (-1, 1)]
    rows += [{"item": f"f{i}", "stereotype": "f", "a_is_stereotype": False, "gap": 2.0 + 0.1 * k, "aligned": False}
             for i in range(5) for k in (-1, 1)]
    f = summarize(rows)
    assert f["mean_gap"] == pytest.approx(3.0)
    assert f["stereotype_effect"] == pytest.approx(2.0)
    assert f["stereotype_ci95"][0] <= 2.0 <= f["stereotype_ci95"][1]
    assert f["share_prefers_a"] == 1.0
    assert f["share_stereotype"] == 0.5  # CrowS-Pairs' share cannot see it: every pair prefers A
    assert f["aligned_share"] == 0.5
    assert f["per_item"]["m0"] == {"mean_gap": pytest.approx(4.0), "stereotype": "m"}
