"""The instruction set: split by fact without leakage, sound multiple choice, determinism, card."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm.data import instructions as ins
from fm.data.schema import SCHEMAS, content_id

COUNTRIES = [f"Country{c}" for c in "ABCDEFGHIJKL"]
CLASSES = {"T-shirt or top": "T恤/上衣", "trousers": "裤子", "pullover": "套头衫", "dress": "连衣裙",
           "coat": "外套", "sandal": "凉鞋", "shirt": "衬衫", "sneaker": "运动鞋", "bag": "包",
           "ankle boot": "短靴"}
CODE = '''
def add_numbers(a, b):
    """Return the sum of two
    numbers. More text that is not the summary.

    A second paragraph.
    """
    return a + b


class Box:
    def volume(self):
        """Compute the volume of the box."""
        return self.w * self.h * self.d

    def undocumented(self):
        return 1


async def fetch_page(url):
    """Download a page and return its body."""
    return url


def shout(text):
    """Upper-case the text and add an exclamation mark."""
    return text.upper() + "!"


def halve(x):
    """Divide a number by two."""
    return x / 2


def first_item(items):
    """Return the first element of a list."""
    return items[0]
'''


def _table(modality: str, rows: list[dict]) -> pa.Table:
    schema = SCHEMAS[modality]
    for i, r in enumerate(rows):
        r.setdefault("position", i + 1)
        r.setdefault("source_file", f"{modality}/sample.jsonl")
        r.setdefault("modality", modality)
        r["id"] = content_id(modality, r["text"], str(i))
        r["n_bytes"] = len(r["text"].encode())
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.fixture
def curated(tmp_path):
    d = tmp_path / "curated"
    d.mkdir()
    triples = []
    for i, c in enumerate(COUNTRIES):
        zh = f"国家{i}"
        facts = [(c, "capital", f"Capital{i}", "en"), (c, "currency", f"Money{i}", "en"),
                 (c, "language", f"Tongue{i}", "en"), (c, "language", f"Speech{i}", "en"),
                 (c, "population", str(1000 + i), "en"), (zh, "货币", f"钱币{i}", "zh"),
                 (zh, "官方语言", f"语言{i}", "zh"),
                 (f"creature{i}", "hypernym", f"kindof{i}", "en"), (f"creature{i}", "antonym", f"anti{i}", "en")]
        for s, rel, o, lang in facts:
            source = "wordnet" if rel in ("hypernym", "antonym") else "countries"
            triples.append({"source": source, "lang": lang, "text": f"{s} | {rel} | {o}", "subject": s,
                            "relation": rel, "object": o})
    images = []
    for en, zh in CLASSES.items():
        article = "" if en == "trousers" else ("an " if en[0] in "aeiou" else "a ")
        for repeat in range(2):  # several images share one caption: one fact
            images.append({"source": "fashion-mnist", "lang": "en", "text": f"a photo of {article}{en}"})
            images.append({"source": "fashion-mnist", "lang": "zh", "text": f"一张{zh}的照片"})
    images.append({"source": "noto-emoji", "lang": "en", "text": "grinning face"})
    poem = "題{i}\n作者{i}\n春{i}山一路鳥，空{i}水滿舟。\n花{i}落知多少，月{i}明照我還。"
    poems = [{"source": "tang-poems", "lang": "zh", "text": poem.format(i=i)} for i in range(12)]
    poems.append({"source": "fortunes", "lang": "en", "text": "A fortune, not a poem."})
    code = [{"source": "cpython", "lang": "python", "text": CODE},
            {"source": "cpython", "lang": "python", "text": "def broken(:\n"},
            {"source": "cpython", "lang": "c", "text": "int main(void) { return 0; }"}]
    for name, rows in [("triples", triples), ("image_text", images), ("text", poems), ("code", code)]:
        pq.write_table(_table(name, rows), d / f"{name}.parquet")
    return d


def _build(curated, out, **kw):
    card = ins.build_instructions(curated, out, heldout_fraction=kw.pop("heldout_fraction", 0.3), **kw)
    return card, pq.read_table(out / "train.parquet").to_pylist(), pq.read_table(out / "heldout.parquet").to_pylist()


def test_split_by_fact_without_leakage(curated, tmp_path):
    _, train, heldout = _build(curated, tmp_path / "out")
    assert heldout and train
    held_ids = {r["fact_id"] for r in heldout}
    assert held_ids.isdisjoint(r["fact_id"] for r in train)
    # every template of a held-out fact is held out; no train row pairs its subject with its answer
    triples = pq.read_table(curated / "triples.parquet").to_pylist()
    facts = ins.collect_triple_facts(triples)
    held_facts = [f for f in facts if f["fact_id"] in held_ids]
    assert held_facts
    train_text = [r["prompt"] + "\n" + r["response"] + "\n" + "\n".join(r["options"] or []) for r in train]
    for f in held_facts:
        for answer in f["answers"]:
            assert not any(f["subject"] in t and answer in t for t in train_text), (f["subject"], answer)
            assert not any(answer in t for t in train_text), answer  # not even as a distractor
        n_templates = len(ins.TEMPLATES[(f["task"], f["lang"])])
        assert sum(r["fact_id"] == f["fact_id"] for r in heldout) == n_templates


def test_multiple_choice_options(curated, tmp_path):
    _, train, heldout = _build(curated, tmp_path / "out", n_options=4)
    mc = [r for r in train + heldout if r["options"] is not None]
    assert {r["task"] for r in mc} == {"hypernym", "capital", "currency", "language", "caption_class",
                                       "poem_next_line", "code_docstring"}
    answers_of = {f["fact_id"]: f["answers"]
                  for f in ins.collect_triple_facts(pq.read_table(curated / "triples.parquet").to_pylist())}
    for r in mc:
        options = r["options"]
        assert len(options) == 4 and len(set(options)) == 4
        assert options[r["answer_index"]] == r["response"]
        assert options.count(r["response"]) == 1
        for wrong in options[: r["answer_index"]] + options[r["answer_index"] + 1:]:
            assert wrong not in answers_of.get(r["fact_id"], [])  # e.g. a country's other language
    for r in train + heldout:
        if r["options"] is None:
            assert r["answer_index"] is None


def test_deterministic_under_seed(curated, tmp_path):
    card_a, train_a, held_a = _build(curated, tmp_path / "a", seed=3)
    card_b, train_b, held_b = _build(curated, tmp_path / "b", seed=3)
    assert (card_a, train_a, held_a) == (card_b, train_b, held_b)
    _, _, held_c = _build(curated, tmp_path / "c", seed=4)
    assert {r["fact_id"] for r in held_c} != {r["fact_id"] for r in held_a}


def test_templates_per_task_and_language(curated, tmp_path):
    _, train, heldout = _build(curated, tmp_path / "out", heldout_fraction=0.0)
    assert not heldout
    templates: dict[tuple, set] = {}
    for r in train:
        templates.setdefault((r["task"], r["lang"]), set()).add(r["template_id"])
    assert set(templates) == set(ins.TEMPLATES)  # every task the data supports was built
    for (task, lang), ids in templates.items():
        assert len(ids) >= (3 if lang == "en" else 2), (task, lang, ids)


def test_task_contents(curated, tmp_path):
    _, train, _ = _build(curated, tmp_path / "out", heldout_fraction=0.0)
    by_template = {}
    for r in train:
        by_template.setdefault(r["template_id"], []).append(r)
    code = {r["response"]: r["prompt"] for r in by_template["code_docstring.en.what"]}
    assert set(code) == {"Return the sum of two numbers.", "Compute the volume of the box.",
                         "Download a page and return its body.", "Upper-case the text and add an exclamation mark.",
                         "Divide a number by two.", "Return the first element of a list."}
    assert "def add_numbers(a, b)" in code["Return the sum of two numbers."]
    assert all("More text" not in p and "sum of two" not in p and "paragraph" not in p for p in code.values())
    classes = {r["prompt"]: r["response"] for r in by_template["caption_class.en.what"]}
    assert len(classes) == 10 and set(classes.values()) == set(CLASSES)  # one fact per distinct caption
    assert set(r["response"] for r in by_template["caption_class.zh.what"]) == set(CLASSES.values())
    for r in by_template["poem_next_line.zh.next"]:  # an opening half-line -> its closing half
        assert r["prompt"].endswith("，") and r["response"].endswith("。")
        first = r["prompt"].removeprefix("續寫下一句：")
        i = first[1:].split("山")[0].split("落")[0]
        closing = {f"春{i}山一路鳥，": f"空{i}水滿舟。", f"花{i}落知多少，": f"月{i}明照我還。"}
        assert r["response"] == closing[first]
    languages = {r["prompt"]: r["response"] for r in by_template["language.en.what"]}
    assert languages["What languages are spoken in CountryA?"] == "Tongue0, Speech0"
    assert {r["response"] for r in by_template["hypernym.en.yes"]} == {"Yes"}
    assert {r["response"] for r in by_template["hypernym.en.no"]} == {"No"}
    assert not any("anti" in r["prompt"] or "1000" in r["response"] for r in train)  # unsupported relations


def test_card_matches_tables(curated, tmp_path):
    out = tmp_path / "out"
    card, train, heldout = _build(curated, out)
    assert json.loads((out / "card.json").read_text()) == card
    for split, rows in (("train", train), ("heldout", heldout)):
        counted = Counter((r["task"], r["lang"]) for r in rows)
        assert counted == Counter({(t, lang): n[split] for t, by in card["counts"].items()
                                   for lang, n in by.items() if n[split]})
        assert card["rows"][split] == len(rows)
        assert card["facts"][split] == len({r["fact_id"] for r in rows})


def test_withheld_facts_are_held_out_triple_facts_and_scale_with_knowledge_probe(curated, tmp_path):
    """The knowledge-injection control: withheld facts are a hash-drawn share of the held-out triple facts, never
    a train fact and never another task; 0 withholds none, 1 every held-out triple fact."""
    counts = {}
    for probe in (0.0, 0.5, 1.0):
        card, train, heldout = _build(curated, tmp_path / str(probe), heldout_fraction=0.6, knowledge_probe=probe)
        withheld = pq.read_table(tmp_path / str(probe) / "withheld.parquet").to_pylist()
        held_triple_facts = {r["fact_id"] for r in heldout if r["task"] in ins.RELATIONS}
        assert {w["fact_id"] for w in withheld} <= held_triple_facts
        assert {w["fact_id"] for w in withheld}.isdisjoint(r["fact_id"] for r in train)
        for w in withheld:  # the triple key the shard stage drops: the task's relation in that language
            assert w["relation"] == ins.RELATIONS[w["task"]][w["lang"]]
            assert w["fact_id"] == ins._hash(w["task"], w["lang"], w["subject"])
        assert card["withheld"] == {t: sum(w["task"] == t for w in withheld) for t in ins.RELATIONS}
        counts[probe] = {w["fact_id"] for w in withheld}
        if probe == 1.0:
            assert counts[probe] == held_triple_facts
    assert counts[0.0] == set() and counts[0.0] < counts[0.5] < counts[1.0]  # nested: one hash, growing threshold
    with pytest.raises(ValueError, match="knowledge_probe"):
        ins.build_instructions(curated, tmp_path / "bad", knowledge_probe=1.5)
