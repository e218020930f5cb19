"""In-context learning and retrieval-augmented multiple choice (fm/eval/icl.py): the prompt by hand, scores
against a manual forward of that prompt, demonstrations never of the item's fact, independence of batch
size, BM25 finding the triple a question was built from, and k=0 / no retrieval equal to closed book.

    pytest tests/test_icl.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers, trainers

from fm.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, new_tokenizer
from fm.eval.icl import (build_retriever, document_head, format_kshot, format_option, kshot_curve,
                         kshot_multiple_choice, question_of, rag_multiple_choice, retrieval_terms, select_demos)
from fm.models import Decoder, ModelConfig
from tests.test_choice import unigram_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

COUNTRIES = [("Aland", "Mariehamn", "Euro"), ("Benin", "Porto-Novo", "CFA Franc"), ("Chad", "N'Djamena", "CFA Franc"),
             ("Denmark", "Copenhagen", "Danish Krone"), ("Egypt", "Cairo", "Egyptian Pound"),
             ("Fiji", "Suva", "Fijian Dollar"), ("Ghana", "Accra", "Ghanaian Cedi"), ("Haiti", "Port-au-Prince", "Gourde")]


def triples() -> list[dict]:
    rows = []
    for i, (country, capital, currency) in enumerate(COUNTRIES):
        rows.append({"subject": country, "relation": "capital", "object": capital,
                     "source_file": "triples/countries.jsonl", "position": 3 * i})
        rows.append({"subject": country, "relation": "currency", "object": currency,
                     "source_file": "triples/countries.jsonl", "position": 3 * i + 1})
    rows.append({"subject": "冈比亚", "relation": "货币", "object": "达拉西", "source_file": "triples/countries.jsonl",
                 "position": 100})
    rows.append({"subject": "冈比亚", "relation": "人口", "object": "1882450", "source_file": "triples/countries.jsonl",
                 "position": 101})
    rows.append({"subject": "hook", "relation": "hypernym", "object": "tool", "source_file": "triples/wordnet.tsv",
                 "position": 7})
    rows.append({"subject": "uncus", "relation": "hypernym", "object": "hook", "source_file": "triples/wordnet.tsv",
                 "position": 8})
    return rows


def mc_item(task: str, country_index: int, answer_index: int, template: str = "mc") -> dict:
    """A capital question about COUNTRIES[country_index] in fm.data.instructions' multiple-choice form."""
    country, capital, _ = COUNTRIES[country_index]
    others = [c for _, c, _ in COUNTRIES if c != capital]
    wrong = (others[country_index:] + others)[:2]
    options = wrong[:answer_index] + [capital] + wrong[answer_index:]
    letters = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return {"task": task, "lang": "en", "fact_id": f"fact-{country}", "template_id": f"{task}.en.{template}",
            "prompt": f"Which city is the capital of {country}?\n{letters}", "response": capital,
            "options": options, "answer_index": float(answer_index),  # float, as in the parquet
            "source_file": "triples/countries.jsonl", "position": 3 * country_index}


def items_and_demos() -> tuple[list[dict], list[dict]]:
    items = [mc_item("capital", i, i % 3) for i in range(0, 4)]
    items.append(mc_item("hypernym", 4, 1))  # a "definition" item, for the group split
    demos = [mc_item("capital", i, (i + 1) % 3) for i in range(0, 8)]  # includes the items' own facts
    demos += [mc_item("capital", i, 0, template="mc2") for i in range(0, 4)]  # a second row of the same facts
    demos += [mc_item("hypernym", i, 2) for i in range(4, 8)]
    return items, demos


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE with fm's special tokens, trained on the test's own words."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [f"Q: Which city is the capital of {c}?\nA: {cap}\n\n" for c, cap, _ in COUNTRIES]
    tok.train_from_iterator(text * 20, trainer=trainer)
    tok.encode_special_tokens = True  # as open_tokenizer sets it
    assert tok.token_to_id("<|text|>") == SPECIAL_IDS["<|text|>"]
    return tok


def random_model(vocab_size: int, seq_len: int = 256) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=4, d_model=32)
    return Decoder(cfg).eval()


def manual_logprob(model, context: list[int], continuation: list[int]) -> float:
    """One unpadded forward of context + continuation; the sum of the continuation's log-probs."""
    ids = torch.tensor([context + continuation])  # (1, S)
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0][0].float(), dim=-1)  # (S, V)
    preds = logp[len(context) - 1:-1]  # (len(continuation), V): position t predicts token t + 1
    return preds[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item()


# ---------------------------------------------------------------- prompt


def test_format_kshot_by_hand():
    assert format_kshot("Capital of Chad?") == "Q: Capital of Chad?\nA:"
    assert format_kshot("Capital of Chad?", [("Capital of Fiji?", "Suva"), ("Capital of Egypt?", "Cairo")]) == (
        "Q: Capital of Fiji?\nA: Suva\n\nQ: Capital of Egypt?\nA: Cairo\n\nQ: Capital of Chad?\nA:")
    assert format_kshot("Capital of Chad?", [("Capital of Fiji?", "Suva")], ["Chad | capital | N'Djamena"]) == (
        "Q: Capital of Fiji?\nA: Suva\n\nChad | capital | N'Djamena\nQ: Capital of Chad?\nA:")
    assert format_option("N'Djamena") == " N'Djamena"
    assert document_head("zh") == [SPECIAL_IDS["<|text|>"], SPECIAL_IDS["<|lang:zh|>"]]
    assert document_head("fr") == [SPECIAL_IDS["<|text|>"], SPECIAL_IDS["<|lang:other|>"]]


def test_question_of_drops_the_lettered_options_only():
    item = mc_item("capital", 2, 1)
    assert question_of(item) == "Which city is the capital of Chad?"
    odd = {**item, "prompt": "Pick the capital of Chad."}  # no option list: the prompt as is
    assert question_of(odd) == "Pick the capital of Chad."


# ---------------------------------------------------------------- scoring


def test_logprobs_and_accuracy_equal_a_manual_forward_of_the_documented_prompt(tokenizer):
    items, demos = items_and_demos()
    model = random_model(tokenizer.get_vocab_size())
    res = kshot_multiple_choice(model, tokenizer, items, demos, k=2, max_len=256, batch_size=4, seed=3)
    correct = correct_norm = 0
    for item, got in zip(items, res["items"]):
        shots = [(question_of(d), d["options"][int(d["answer_index"])]) for d in select_demos(item, demos, 2, 3)]
        assert len(shots) == 2 and got["shots"] == 2
        context = document_head("en") + tokenizer.encode(format_kshot(question_of(item), shots)).ids
        lps = [manual_logprob(model, context, tokenizer.encode(" " + o).ids) for o in item["options"]]
        assert got["logprobs"] == pytest.approx(lps, abs=1e-4)
        norm = [lp / len(o.encode()) for lp, o in zip(lps, item["options"])]
        correct += max(range(len(lps)), key=lps.__getitem__) == int(item["answer_index"])
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == int(item["answer_index"])
    assert res["accuracy"] == pytest.approx(correct / len(items))
    assert res["accuracy_norm"] == pytest.approx(correct_norm / len(items))
    assert res["chance"] == pytest.approx(1 / 3)
    assert res["n"] == 5 and res["per_task"]["capital"]["n"] == 4
    assert res["groups"]["knowledge"]["n"] == 4 and res["groups"]["definition"]["n"] == 1
    assert res["groups"]["knowledge"]["accuracy"] == pytest.approx(
        sum(r["prediction"] == r["answer_index"] for r in res["items"][:4]) / 4)


def test_a_model_that_always_says_the_answer_token_scores_exactly_its_items(tokenizer):
    """A Decoder whose every position predicts the same logits: options that are one loved token win."""
    V = tokenizer.get_vocab_size()
    cairo = tokenizer.encode(" Cairo").ids
    assert len(cairo) == 1
    logits = torch.zeros(V)
    logits[cairo[0]] = 8.0
    model = unigram_model(V, logits, seq_len=256)  # tests/test_choice.py: these logits at every position
    items = [mc_item("capital", 4, 0), mc_item("capital", 4, 2), mc_item("capital", 3, 1)]  # Cairo, Cairo, Copenhagen
    res = kshot_multiple_choice(model, tokenizer, items, items_and_demos()[1], k=1, max_len=256, seed=0)
    logp = F.log_softmax(logits, dim=-1)
    expected = [[sum(logp[t].item() for t in tokenizer.encode(" " + o).ids) for o in it["options"]] for it in items]
    for got, exp in zip(res["items"], expected):
        assert got["logprobs"] == pytest.approx(exp, abs=1e-4)
    assert [r["prediction"] for r in res["items"]] == [0, 2, items[2]["options"].index("Cairo")]
    assert res["accuracy"] == pytest.approx(2 / 3)


def test_demonstrations_never_carry_the_items_fact_and_do_not_depend_on_item_order(tokenizer):
    items, demos = items_and_demos()
    for item in items:
        for k in (1, 3, 50):
            chosen = select_demos(item, demos, k, seed=1)
            assert chosen and all(d["fact_id"] != item["fact_id"] for d in chosen)
            assert all(d["task"] == item["task"] and d["lang"] == item["lang"] for d in chosen)
            assert len({id(d) for d in chosen}) == len(chosen)
        own = [d for d in demos if d["fact_id"] == item["fact_id"]]
        assert own  # the pool offers the item's own fact; it must be skipped
        assert select_demos(item, demos, 3, seed=1) == select_demos(item, demos, 3, seed=1)
    model = random_model(tokenizer.get_vocab_size())
    forward = kshot_multiple_choice(model, tokenizer, items, demos, k=2, max_len=256, seed=5)
    backward = kshot_multiple_choice(model, tokenizer, items[::-1], demos, k=2, max_len=256, seed=5)
    assert torch.allclose(torch.tensor([r["logprobs"] for r in forward["items"]]),
                          torch.tensor([r["logprobs"] for r in backward["items"][::-1]]), atol=1e-5)


@pytest.mark.parametrize("k", [0, 2])
def test_scores_do_not_depend_on_batch_size(tokenizer, k):
    items, demos = items_and_demos()
    model = random_model(tokenizer.get_vocab_size())
    one = kshot_multiple_choice(model, tokenizer, items, demos, k=k, max_len=256, batch_size=1)
    for bs in (3, 16):
        other = kshot_multiple_choice(model, tokenizer, items, demos, k=k, max_len=256, batch_size=bs)
        assert torch.allclose(torch.tensor([r["logprobs"] for r in other["items"]]),
                              torch.tensor([r["logprobs"] for r in one["items"]]), rtol=1e-6, atol=1e-6)
        for key in ("accuracy", "accuracy_norm", "chance", "n", "per_task", "groups", "shots_mean"):
            assert other[key] == one[key]


def test_too_long_prompts_drop_whole_demonstrations_from_the_front(tokenizer):
    items, demos = items_and_demos()
    model = random_model(tokenizer.get_vocab_size(), seq_len=256)
    max_len = 48
    res = kshot_multiple_choice(model, tokenizer, items[:2], demos, k=4, max_len=max_len)
    for item, got in zip(items[:2], res["items"]):
        assert 0 < got["shots"] < 4
        kept = select_demos(item, demos, 4, seed=0)[4 - got["shots"]:]  # the last ones, nearest the question
        shots = [(question_of(d), d["options"][int(d["answer_index"])]) for d in kept]
        context = document_head("en") + tokenizer.encode(format_kshot(question_of(item), shots)).ids
        conts = [tokenizer.encode(" " + o).ids for o in item["options"]]
        assert len(context) + max(map(len, conts)) <= max_len
        assert got["logprobs"] == pytest.approx([manual_logprob(model, context, c) for c in conts], abs=1e-4)


def test_kshot_curve_is_kshot_per_k(tokenizer):
    items, demos = items_and_demos()
    model = random_model(tokenizer.get_vocab_size())
    curve = kshot_curve(model, tokenizer, items, demos, ks=[0, 1], max_len=256)
    assert list(curve) == [0, 1]
    assert curve[0]["shots_mean"] == 0 and curve[1]["shots_mean"] == 1
    assert curve[1]["accuracy"] == kshot_multiple_choice(model, tokenizer, items, demos, 1, 256)["accuracy"]


def test_bad_items_are_refused(tokenizer):
    model = random_model(tokenizer.get_vocab_size())
    item = mc_item("capital", 0, 0)
    with pytest.raises(ValueError, match="no items"):
        kshot_multiple_choice(model, tokenizer, [], [], 0, 256)
    with pytest.raises(ValueError, match="no options"):
        kshot_multiple_choice(model, tokenizer, [{**item, "options": None}], [], 0, 256)
    with pytest.raises(ValueError, match="answer_index"):
        kshot_multiple_choice(model, tokenizer, [{**item, "answer_index": 7.0}], [], 0, 256)
    with pytest.raises(ValueError, match="k must be"):
        kshot_multiple_choice(model, tokenizer, [item], [], -1, 256)


# ---------------------------------------------------------------- retrieval


def test_retrieval_terms_split_chinese_into_characters_and_bigrams():
    assert retrieval_terms("Which city is the capital of Chad?") == ["city", "capital", "chad"]
    assert retrieval_terms("冈比亚的货币") == ["冈", "比", "亚", "的", "货", "币", "冈比", "比亚", "亚的", "的货", "货币"]


def test_bm25_retrieves_the_triple_a_question_was_built_from():
    rows = triples()
    retriever = build_retriever(rows)
    assert retriever.lines[0] == "Aland | capital | Mariehamn"
    for i, (country, capital, currency) in enumerate(COUNTRIES):
        top = retriever.search(f"Which city is the capital of {country}?", 1)
        assert retriever.lines[top[0]] == f"{country} | capital | {capital}"
        top = retriever.search(f"Which of these is the currency of {country}?", 1)
        assert retriever.lines[top[0]] == f"{country} | currency | {currency}"
    top = retriever.search("下列哪一项是冈比亚的货币？", 2)
    assert retriever.lines[top[0]] == "冈比亚 | 货币 | 达拉西"
    assert retriever.lines[retriever.search("uncus is a kind of which of the following?", 1)[0]] == "uncus | hypernym | hook"
    assert retriever.search("the of which", 3) == []  # no indexed term: nothing, not an error


def test_rag_puts_the_retrieved_triples_before_the_question_and_reports_recall(tokenizer):
    items, demos = items_and_demos()
    items = items[:4]  # capital questions about COUNTRIES[0..3]; their answer triples are in the index
    retriever = build_retriever(triples())
    model = random_model(tokenizer.get_vocab_size())
    res = rag_multiple_choice(model, tokenizer, items, retriever, top_k=2, max_len=256, batch_size=3)
    assert res["recall_at_k"] == 1.0 and res["recall_per_task"] == {"capital": 1.0}
    for item, got, keys in zip(items, res["items"], res["retrieved"]):
        assert keys[0] == (item["source_file"], item["position"])
        hits = retriever.search(question_of(item), 2)
        facts = [retriever.lines[i] for i in reversed(hits)]  # the best one last, nearest the question
        assert facts[-1].startswith(item["prompt"].split("capital of ")[1].split("?")[0])
        context = document_head("en") + tokenizer.encode(format_kshot(question_of(item), [], facts)).ids
        assert got["logprobs"] == pytest.approx(
            [manual_logprob(model, context, tokenizer.encode(" " + o).ids) for o in item["options"]], abs=1e-4)
    assert res["facts_mean"] == 2
    moved = {**items[0], "position": 999}  # a fact whose answer triple is not retrieved
    assert rag_multiple_choice(model, tokenizer, [moved], retriever, 2, 256)["recall_at_k"] == 0.0


@pytest.mark.parametrize("k", [0, 2])
def test_closed_book_is_kshot_and_no_retrieval_is_closed_book(tokenizer, k):
    items, demos = items_and_demos()
    retriever = build_retriever(triples())
    model = random_model(tokenizer.get_vocab_size())
    rag = rag_multiple_choice(model, tokenizer, items, retriever, top_k=2, max_len=256, demos=demos, k=k, seed=4)
    closed = kshot_multiple_choice(model, tokenizer, items, demos, k=k, max_len=256, seed=4)
    assert rag["closed_book"] == closed  # per-item scores too (the stage splits them by the facts' exposure)
    reused = rag_multiple_choice(model, tokenizer, items, retriever, top_k=2, max_len=256, demos=demos, k=k, seed=4,
                                 closed_book=closed)  # the stage passes its k-shot pass instead of scoring it again
    assert reused["closed_book"] is closed and reused["items"] == rag["items"]
    none = rag_multiple_choice(model, tokenizer, items, retriever, top_k=0, max_len=256, demos=demos, k=k, seed=4)
    assert {key: none[key] for key in closed} == closed
    assert none["facts_mean"] == 0
    assert rag["items"][0]["logprobs"] != none["items"][0]["logprobs"]  # the triples did change the prompt
