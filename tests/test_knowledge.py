"""Knowledge injection (fm/eval/knowledge.py): the matched probe set, the cloze in the pretraining format against
a manual forward, accuracies and the gap by hand, batch-size independence, and the exposure arithmetic.

    pytest tests/test_knowledge.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fm.data.tokenizer import SPECIAL_IDS
from fm.eval.knowledge import cloze_pair, knowledge_injection, pretraining_exposure, probe_items, summarize
from tests.test_icl import COUNTRIES, manual_logprob, random_model, tokenizer  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fact_rows() -> tuple[list[dict], list[dict]]:
    """(held-out instruction rows, curated triples): a capital fact per country (mc and a yes/no row each) and
    three hypernym facts, the answer at a varying index."""
    heldout, triples = [], []
    capitals = [cap for _, cap, _ in COUNTRIES]
    for i, (country, capital, _) in enumerate(COUNTRIES):
        triples.append({"subject": country, "relation": "capital", "object": capital,
                        "source_file": "triples/countries.jsonl", "position": i})
        wrong = [c for c in capitals if c != capital][i % 4:][:3]
        options = wrong[:i % 4] + [capital] + wrong[i % 4:]
        heldout.append({"task": "capital", "lang": "en", "fact_id": f"cap-{i}", "template_id": "capital.en.mc",
                        "prompt": f"What is the capital of {country}?", "response": capital, "options": options,
                        "answer_index": float(i % 4), "source_file": "triples/countries.jsonl", "position": i})
        heldout.append({"task": "capital", "lang": "en", "fact_id": f"cap-{i}", "template_id": "capital.en.yes_no",
                        "prompt": f"Is {capital} the capital of {country}?", "response": "Yes", "options": None,
                        "answer_index": None, "source_file": "triples/countries.jsonl", "position": i})
    for j, (word, kind) in enumerate([("uncus", "hook"), ("hook", "tool"), ("beagle", "dog")]):
        triples.append({"subject": word, "relation": "hypernym", "object": kind, "source_file": "triples/wordnet.tsv",
                        "position": j})
        heldout.append({"task": "hypernym", "lang": "en", "fact_id": f"hyp-{j}", "template_id": "hypernym.en.mc",
                        "prompt": f"{word} is a kind of which of the following?", "response": kind,
                        "options": [kind, "pizza"] if j % 2 == 0 else ["pizza", kind], "answer_index": float(j % 2),
                        "source_file": "triples/wordnet.tsv", "position": j})
    return heldout, triples


def test_probe_items_are_one_mc_row_per_fact_matched_per_stratum():
    heldout, triples = fact_rows()
    withheld = {"cap-0", "cap-1", "cap-2", "hyp-0"}  # capital: 3 unseen, 5 seen; hypernym: 1 unseen, 2 seen
    items = probe_items(heldout, triples, withheld, per_stratum=10, seed=0)
    by = lambda task, group: [i for i in items if i["task"] == task and i["group"] == group]  # noqa: E731
    assert len(by("capital", "unseen")) == len(by("capital", "seen")) == 3  # the smaller group's count
    assert len(by("hypernym", "unseen")) == len(by("hypernym", "seen")) == 1
    assert {i["fact_id"] for i in by("capital", "unseen")} == {"cap-0", "cap-1", "cap-2"}
    assert all(i["template_id"].endswith(".mc") for i in items) and len({i["fact_id"] for i in items}) == len(items)
    uncus = next(i for i in items if i["fact_id"] == "hyp-0")
    assert (uncus["subject"], uncus["relation"], uncus["answer_index"]) == ("uncus", "hypernym", 0)
    assert probe_items(heldout, triples, withheld, per_stratum=10, seed=0) == items  # deterministic
    capped = probe_items(heldout, triples, withheld, per_stratum=2, seed=0)
    assert sum(i["task"] == "capital" for i in capped) == 4
    assert probe_items(heldout, triples, set(), per_stratum=10) == []  # no unseen fact: nothing to match
    assert probe_items(heldout, triples, withheld, per_stratum=0) == []
    other_seed = {i["fact_id"] for i in probe_items(heldout, triples, withheld, per_stratum=10, seed=5)}
    assert {"cap-0", "cap-1", "cap-2"} <= other_seed  # every unseen fact is in; the seen draw may change


def test_cloze_pair_is_the_pretraining_triple_format(tokenizer):
    item = {"subject": "Chad", "relation": "capital", "lang": "en"}
    context, continuation = cloze_pair(tokenizer, item, "N'Djamena")
    assert context[:2] == [SPECIAL_IDS["<|triples|>"], SPECIAL_IDS["<|lang:en|>"]]
    assert tokenizer.decode(context[2:]) + tokenizer.decode(continuation) == "Chad | capital | N'Djamena"
    assert continuation == tokenizer.encode(" N'Djamena", add_special_tokens=False).ids
    assert cloze_pair(tokenizer, {**item, "lang": "zh"}, "x")[0][1] == SPECIAL_IDS["<|lang:zh|>"]


def test_summarize_by_hand():
    items = [{"group": g, "task": t, "answer_index": 0, "options": ["a", "b", "c", "d"]}
             for g, t in [("seen", "capital"), ("seen", "capital"), ("seen", "hypernym"), ("seen", "hypernym"),
                          ("unseen", "capital"), ("unseen", "capital"), ("unseen", "hypernym"), ("unseen", "hypernym")]]
    preds = [0, 0, 0, 1, 0, 1, 1, 1]  # seen 3/4, unseen 1/4
    res = summarize(items, preds, seed=0)
    assert res["seen"]["accuracy"] == 0.75 and res["unseen"]["accuracy"] == 0.25 and res["chance"] == 0.25
    assert res["gap"] == pytest.approx(0.5)
    assert res["seen"]["by_group"] == {"knowledge": {"n": 2, "accuracy": 1.0}, "definition": {"n": 2, "accuracy": 0.5}}
    lo, hi = res["gap_ci"]
    assert -1 <= lo <= 0.5 <= hi <= 1 and lo < hi
    assert summarize(items, preds, seed=0) == res  # the bootstrap is seeded
    one_sided = summarize(items[:4], preds[:4])
    assert one_sided["gap"] is None and one_sided["unseen"]["accuracy"] is None


def test_scores_equal_a_manual_forward_and_do_not_depend_on_batch_size(tokenizer):
    heldout, triples = fact_rows()
    items = probe_items(heldout, triples, {"cap-0", "cap-1", "cap-2", "hyp-0"}, per_stratum=10)
    model = random_model(tokenizer.get_vocab_size())
    res = knowledge_injection(model, tokenizer, items, max_len=256, batch_size=3)
    for item, pred in zip(items, res["cloze"]["predictions"]):
        lps = [manual_logprob(model, *cloze_pair(tokenizer, item, o)) for o in item["options"]]
        assert pred == int(np.argmax(lps))
    correct = [p == i["answer_index"] for p, i in zip(res["cloze"]["predictions"], items)]
    seen = [c for c, i in zip(correct, items) if i["group"] == "seen"]
    assert res["cloze"]["seen"]["accuracy"] == pytest.approx(sum(seen) / len(seen))
    for batch_size in (1, 7, 64):
        other = knowledge_injection(model, tokenizer, items, max_len=256, batch_size=batch_size)
        assert other == res
    assert set(res) == {"n", "cloze", "qa"} and res["n"] == len(items)
    with pytest.raises(ValueError, match="no probe items"):
        knowledge_injection(model, tokenizer, [], max_len=256)


def test_a_model_that_knows_the_seen_facts_shows_the_gap(tokenizer):
    """A model that puts its mass on the answers of the seen facts only: cloze accuracy 1 on seen; on unseen facts
    uniform logits, so the option of fewest tokens wins (ties: the lowest index)."""
    heldout, triples = fact_rows()
    items = probe_items(heldout, triples, {"cap-0", "cap-1", "cap-2", "hyp-0"}, per_stratum=10)

    class Oracle(nn.Module):
        """Logits 0 everywhere but 50 on each seen fact's answer tokens after its cloze context. Not a Decoder
        (like an exported graph it takes ids only), so rows are scored one pair each."""

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg

        def forward(self, ids, **kw):
            logits = torch.zeros(*ids.shape, self.cfg.vocab_size)  # (B, T, V): ties go to the lowest option
            for b in range(ids.shape[0]):
                prefix = ids[b].tolist()
                for item in items:
                    if item["group"] != "seen":
                        continue
                    context, cont = cloze_pair(tokenizer, item, item["options"][item["answer_index"]])
                    n = len(context)
                    if prefix[:n] == context:
                        for t, tok in enumerate(cont[:ids.shape[1] - n + 1]):  # what this row's inputs reach
                            logits[b, n - 1 + t, tok] = 50.0
            return (logits,)

    oracle = Oracle(random_model(tokenizer.get_vocab_size()).cfg)
    res = knowledge_injection(oracle.eval(), tokenizer, items, max_len=256, batch_size=4, formats=("cloze",))
    assert res["cloze"]["seen"]["accuracy"] == 1.0
    def shortest(item):
        sizes = [len(cloze_pair(tokenizer, item, o)[1]) for o in item["options"]]
        return min(range(len(sizes)), key=lambda k: (sizes[k], k))

    expected = np.mean([shortest(i) == i["answer_index"] for i in items if i["group"] == "unseen"])
    assert res["cloze"]["unseen"]["accuracy"] == pytest.approx(expected)
    assert res["cloze"]["gap"] == pytest.approx(1 - expected) and expected < 1
    assert res["cloze"]["gap_ci"][0] >= 0 and "qa" not in res  # seen is always 1: no resample goes below 0


def test_pretraining_exposure_by_hand(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"pretrain": {
        "batch_size": 8, "grad_accum": 2, "seq_len": 256, "mix": {"text": 0.5, "triples": 0.25, "image_text": 0.25}}}))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 100, "layout": {"dp": 2}}))
    manifest = {"totals": {"counts": {"text": {"tokens": 10**6}, "triples": {"tokens": 40_960}}},
                "withheld": {"facts": 3, "triples": 5}}  # no image_text tokens: its share goes to the others
    got = pretraining_exposure(tmp_path, manifest)
    drawn = 100 * 8 * 2 * 2 * 256 * 0.25 / 0.75
    assert got == {"triple_tokens": 40_960, "triple_tokens_drawn": round(drawn), "passes": round(drawn / 40_960, 4),
                   "withheld": {"facts": 3, "triples": 5}}
    assert pretraining_exposure(tmp_path / "missing", manifest) is None
    assert pretraining_exposure(tmp_path, {"totals": {"counts": {"text": {"tokens": 5}}}}) is None
