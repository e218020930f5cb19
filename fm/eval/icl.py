"""In-context learning (GPT-3 style k-shot multiple choice) and retrieval-augmented multiple choice (issue 12).

    from fm.eval.icl import build_retriever, kshot_curve, kshot_multiple_choice, rag_multiple_choice
    res = kshot_multiple_choice(model, tokenizer, heldout_rows, train_rows, k=4, max_len=256)
    res["accuracy"], res["groups"]["knowledge"]["accuracy"], res["shots_mean"]
    curve = kshot_curve(model, tokenizer, heldout_rows, train_rows, ks=[0, 1, 4], max_len=256)
    retriever = build_retriever(pd.read_parquet("data/04_curated/triples.parquet"))
    rag = rag_multiple_choice(model, tokenizer, heldout_rows, retriever, top_k=3, max_len=256)
    rag["accuracy"], rag["closed_book"]["accuracy"], rag["recall_at_k"]

In-context learning as Brown et al. (2020, sec. 2.4) measured it: a base LM sees k solved examples
as plain text, then the question; each option is scored by its log-likelihood as a continuation
(fm.eval.choice.continuation_logprobs), and the likeliest is the prediction. No chat template: this
measures what the pretrained model does with a document that looks like a Q/A sheet. The prompt is
`format_kshot` (importable, for the lm-evaluation-harness parity):

    <|text|><|lang:xx|>Q: {demo question}\nA: {demo answer}\n\n   (k times)
    {retrieved triple}\n ...                                         (RAG only, the best one last)
    Q: {question}\nA:                                                 continuation " {option}"

The two ids in front are how every pretraining document starts (fm.data.shards). The question is the
item's prompt without its lettered option list ("A. Kabul" ...): GPT-3 scores the option text after a
bare question (the listed-options format is MMLU's, a different task). Demonstrations are multiple-choice
rows of the same task and language from the train split, drawn per item with a seed that depends only on
(seed, fact_id, template_id) (so scores do not depend on item order or batch size), never of the item's
own fact. When the prompt plus the longest option does not fit max_len, whole demonstrations are dropped
from the front, then retrieved triples (least relevant first); only a question that alone overflows is
cut token-wise from the left by continuation_logprobs. `shots_mean` reports the shots actually kept.

Retrieval (REALM/RAG style, sparse): BM25 (the maintained `bm25s` library) over linearized triples
"subject | relation | object" (the curated `text`, as pretraining saw them). Terms: lowercased word
runs minus English stopwords; a run of CJK characters gives its characters and character bigrams
(Chinese has no spaces, so "阿富汗的货币" must still match "阿富汗" and "货币"). The question alone is the
query. recall@k: an item's fact was built (fm.data.instructions.collect_triple_facts) from the triples
of one (relation, lang, subject); its (source_file, position) is that of the first of them, whose object
is the item's answer. A hit is a retrieved triple with the same (source_file, position): the triple
that states the answer.

Task groups: knowledge = capital, currency, language (country triples); definition = hypernym
(WordNet "X is a kind of Y", the nearest the data has to definitions). Other tasks count in the totals
and per_task, in no group.
"""

from __future__ import annotations

import random
import re
import statistics

import numpy as np
from torch import nn

from fm.data.tokenizer import LANG_TOKENS, SPECIAL_IDS
from fm.eval.choice import continuation_logprobs

TASK_GROUPS = {"knowledge": ("capital", "currency", "language"), "definition": ("hypernym",)}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"\w+")


# ---------------------------------------------------------------- prompt


def question_of(item: dict) -> str:
    """The item's prompt without the lettered option list that fm.data.instructions appends ("A. x" per line)."""
    lines = item["prompt"].split("\n")
    options = list(item["options"])
    letters = [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    if len(lines) > len(options) and lines[-len(options):] == letters:
        return "\n".join(lines[:-len(options)])
    return item["prompt"]


def answer_of(item: dict) -> str:
    return str(item["options"][int(item["answer_index"])])


def format_kshot(question: str, demonstrations: list[tuple[str, str]] = (), facts: list[str] = ()) -> str:
    """The plain-text context: "Q: {q}\\nA: {a}\\n\\n" per (question, answer) demonstration, then each fact on its
    own line, then "Q: {question}\\nA:". Each option is scored as the continuation format_option(option)."""
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in demonstrations)
    known = "".join(f"{f}\n" for f in facts)
    return f"{shots}{known}Q: {question}\nA:"


def format_option(option: str) -> str:
    return f" {option}"


def document_head(lang: str) -> list[int]:
    """The ids every pretraining document starts with: the modality (<|text|>) and the language."""
    return [SPECIAL_IDS["<|text|>"], SPECIAL_IDS[LANG_TOKENS.get(lang, "<|lang:other|>")]]


def select_demos(item: dict, demos: list[dict], k: int, seed: int) -> list[dict]:
    """k multiple-choice train rows of the item's task and language, none of its fact; the same for the same
    (seed, fact_id, template_id) whatever else is evaluated. Fewer when the pool is smaller."""
    if k <= 0:
        return []
    pool = [d for d in demos if d["task"] == item["task"] and d["lang"] == item["lang"]
            and d["fact_id"] != item["fact_id"] and _has_options(d)]
    rng = random.Random(f"{seed}\x00{item['fact_id']}\x00{item.get('template_id', '')}")
    return rng.sample(pool, min(k, len(pool)))


def _has_options(row: dict) -> bool:
    options = row.get("options")
    return options is not None and len(options) > 0  # len(): a pandas row holds an array


def _check(items: list[dict]) -> list[dict]:
    """Rows as plain dicts with an int answer_index (parquet stores it as float, as the column is nullable)."""
    if not items:
        raise ValueError("no items to score")
    out = []
    for n, item in enumerate(items):
        item = dict(item)
        if not _has_options(item):
            raise ValueError(f"item {n} has no options (not a multiple-choice item)")
        options, answer = list(item["options"]), item.get("answer_index")
        if answer is None or answer != answer or int(answer) != answer or not 0 <= int(answer) < len(options):
            raise ValueError(f"item {n}: answer_index {answer!r} is not an index into its {len(options)} options")
        if not all(options):
            raise ValueError(f"item {n} has an empty option (no bytes to normalize by)")
        item["options"], item["answer_index"] = options, int(answer)
        out.append(item)
    return out


# ---------------------------------------------------------------- scoring


def _score(model: nn.Module, tokenizer, items: list[dict], shots: list[list[dict]], facts: list[list[str]],
           max_len: int, batch_size: int, device) -> dict:
    """Build each item's context (dropping demonstrations, then facts, from the front until it fits), score every
    option, and summarize."""
    pairs, n_bytes, kept_shots, kept_facts = [], [], [], []
    for item, item_shots, item_facts in zip(items, shots, facts):
        conts = [tokenizer.encode(format_option(o), add_special_tokens=False).ids for o in item["options"]]
        room = max_len - max(len(c) for c in conts)
        head, question = document_head(item["lang"]), question_of(item)
        demos = [(question_of(d), answer_of(d)) for d in item_shots]
        known = list(item_facts)
        while True:
            context = head + tokenizer.encode(format_kshot(question, demos, known), add_special_tokens=False).ids
            if len(context) <= room or not (demos or known):
                break
            if demos:
                demos = demos[1:]
            else:
                known = known[1:]
        pairs.extend((context, c) for c in conts)
        n_bytes.append([len(o.encode("utf-8")) for o in item["options"]])
        kept_shots.append(len(demos))
        kept_facts.append(len(known))
    scores = iter(continuation_logprobs(model, pairs, max_len, batch_size, device=device))

    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)  # the first of equals: the lowest index

    per_item = []
    for item, sizes, n_shots, n_facts in zip(items, n_bytes, kept_shots, kept_facts):
        lps = [next(scores)[0] for _ in sizes]
        pred, pred_norm = argmax(lps), argmax([lp / b for lp, b in zip(lps, sizes)])
        per_item.append({"task": item["task"], "lang": item["lang"], "fact_id": item["fact_id"],
                         "template_id": item.get("template_id"), "answer_index": item["answer_index"],
                         "logprobs": lps, "n_bytes": sizes, "prediction": pred, "prediction_norm": pred_norm,
                         "shots": n_shots, "facts": n_facts})
    out = _summary(per_item)
    out["per_task"] = {t: _summary([r for r in per_item if r["task"] == t])
                       for t in sorted({r["task"] for r in per_item})}
    out["groups"] = {g: _summary([r for r in per_item if r["task"] in tasks])
                     for g, tasks in TASK_GROUPS.items() if any(r["task"] in tasks for r in per_item)}
    out["shots_mean"] = statistics.fmean(kept_shots)
    out["items"] = per_item
    return out


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n,
            "accuracy": sum(r["prediction"] == r["answer_index"] for r in rows) / n,
            "accuracy_norm": sum(r["prediction_norm"] == r["answer_index"] for r in rows) / n,
            "chance": sum(1 / len(r["logprobs"]) for r in rows) / n}


def kshot_multiple_choice(model: nn.Module, tokenizer, items: list[dict], demos: list[dict], k: int, max_len: int,
                          batch_size: int = 32, seed: int = 0, device="cpu") -> dict:
    """GPT-3 style k-shot multiple choice by log-likelihood (k=0: zero-shot).

    items: multiple-choice rows (prompt, options, answer_index, task, lang, fact_id[, template_id]), e.g.
    held-out fm.data.instructions rows; demos: rows to draw demonstrations from (the train split). tokenizer:
    a tokenizers.Tokenizer (fm.data.tokenizer.open_tokenizer). The model must already be on device. Returns
        n, accuracy, accuracy_norm, chance   as fm.eval.choice.multiple_choice (norm: log-likelihood / option bytes)
        per_task, groups                     {name: {n, accuracy, accuracy_norm, chance}}; groups: TASK_GROUPS
        shots_mean                           demonstrations kept per item after fitting max_len
        items                                per item: task, lang, fact_id, template_id, answer_index, logprobs
                                             (one per option), n_bytes, prediction, prediction_norm, shots, facts
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    items = _check(items)
    shots = [select_demos(item, demos, k, seed) for item in items]
    return _score(model, tokenizer, items, shots, [[] for _ in items], max_len, batch_size, device)


def kshot_curve(model: nn.Module, tokenizer, items: list[dict], demos: list[dict], ks: list[int], max_len: int,
                batch_size: int = 32, seed: int = 0, device="cpu") -> dict[int, dict]:
    """kshot_multiple_choice for each k in ks: {k: result}."""
    return {k: kshot_multiple_choice(model, tokenizer, items, demos, k, max_len, batch_size, seed, device)
            for k in ks}


# ---------------------------------------------------------------- retrieval


def retrieval_terms(text: str, stopwords: frozenset[str] | None = None) -> list[str]:
    """BM25 terms: lowercased word runs without English stopwords; CJK runs as characters and character bigrams."""
    stop = _STOPWORDS if stopwords is None else stopwords
    terms = []
    for word in _WORD.findall(text.lower()):
        rest = word
        for run in _CJK.findall(word):
            terms.extend(run)
            terms.extend(run[i:i + 2] for i in range(len(run) - 1))
            rest = rest.replace(run, " ")
        terms.extend(w for w in rest.split() if w not in stop)
    return terms


class Retriever:
    """BM25 over linearized triples. lines[i] is triple i's text; keys[i] its (source_file, position)."""

    def __init__(self, lines: list[str], keys: list[tuple[str, int]]):
        import bm25s  # a runtime dependency, imported where used so fm.eval imports without it

        self.lines, self.keys = lines, keys
        self.index = bm25s.BM25()
        self.index.index([retrieval_terms(line) or ["\x00empty"] for line in lines], show_progress=False)
        self.vocab = self.index.vocab_dict

    def search(self, query: str, top_k: int) -> list[int]:
        """Indices of the top_k triples for query, best first; [] when no term of the query is in the index."""
        terms = [t for t in retrieval_terms(query) if t in self.vocab]
        if not terms or top_k <= 0:
            return []
        k = min(top_k, len(self.lines))
        docs, scores = self.index.retrieve([terms], k=k, show_progress=False, n_threads=1)
        # BM25 ties would otherwise be ordered by the top-k routine; order them by index instead.
        ranked = sorted(zip(scores[0].tolist(), docs[0].tolist()), key=lambda p: (-p[0], p[1]))
        return [int(d) for s, d in ranked if s > 0]


def build_retriever(triples) -> Retriever:
    """A BM25 retriever over triples: a DataFrame or dicts with subject, relation, object, source_file, position
    (data/04_curated/triples.parquet)."""
    rows = triples.to_dict("records") if hasattr(triples, "to_dict") else list(triples)
    if not rows:
        raise ValueError("no triples to index")
    lines = [f"{r['subject']} | {r['relation']} | {r['object']}" for r in rows]
    keys = [(r["source_file"], int(r["position"])) for r in rows]
    return Retriever(lines, keys)


def rag_multiple_choice(model: nn.Module, tokenizer, items: list[dict], retriever: Retriever, top_k: int,
                        max_len: int, batch_size: int = 32, demos: list[dict] | None = None, k: int = 0,
                        seed: int = 0, device="cpu", closed_book: dict | None = None) -> dict:
    """Multiple choice with the top_k retrieved triples before the question, beside the closed-book score.

    Same prompt and demonstrations (k from demos, as kshot_multiple_choice) with and without the retrieved
    triples. Returns kshot_multiple_choice's fields for the open-book run, plus
        recall_at_k   share of items whose answer triple (same source_file, position) is among the top_k
        retrieved     per item, the retrieved (source_file, position) keys, best first
        closed_book   kshot_multiple_choice's fields without retrieval: `closed_book` when given (the k-shot
                      result of the same items, demos, k and seed, already scored), else scored here
    """
    items = _check(items)
    shots = [select_demos(item, demos or [], k, seed) for item in items]
    hits = [retriever.search(question_of(item), top_k) for item in items]
    facts = [[retriever.lines[i] for i in reversed(h)] for h in hits]  # the best one nearest the question
    out = _score(model, tokenizer, items, shots, facts, max_len, batch_size, device)
    closed = closed_book or _score(model, tokenizer, items, shots, [[] for _ in items], max_len, batch_size, device)
    found = [(item.get("source_file"), int(item.get("position", -1))) in {retriever.keys[i] for i in h}
             for item, h in zip(items, hits)]
    out["recall_at_k"] = float(np.mean(found))
    out["recall_per_task"] = {t: float(np.mean([f for f, it in zip(found, items) if it["task"] == t]))
                              for t in sorted({it["task"] for it in items})}
    out["facts_mean"] = statistics.fmean(r["facts"] for r in out["items"])
    out["retrieved"] = [[retriever.keys[i] for i in h] for h in hits]
    out["closed_book"] = closed
    return out


def _english_stopwords() -> frozenset[str]:
    try:
        from bm25s.stopwords import STOPWORDS_EN
    except ImportError:  # bm25s missing: the prompt functions above still work
        STOPWORDS_EN = ()
    return frozenset(STOPWORDS_EN) | {"which", "what", "following", "these", "kind"}


_STOPWORDS = _english_stopwords()
