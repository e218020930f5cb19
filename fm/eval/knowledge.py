"""Knowledge injection (ERNIE-style), measured: facts pretraining saw only as triples against matched unseen facts.

    from fm.eval.knowledge import knowledge_injection, pretraining_exposure, probe_items
    items = probe_items(heldout_rows, triples, withheld_ids, per_stratum=100, seed=0)
    res = knowledge_injection(model, tokenizer, items, max_len=256, batch_size=16)
    res["cloze"]["seen"]["accuracy"], res["cloze"]["unseen"]["accuracy"], res["cloze"]["gap"], res["cloze"]["gap_ci"]

The experiment is built upstream. fm.data.instructions holds a share of the triple facts (hypernym, capital,
currency, language) out of the instruction set, and withholds a share `instructions.knowledge_probe` of those
(drawn by a second hash of the fact, so independent of its content) from pretraining as well: the shard stage
leaves their triples out. So a held-out fact is either
    seen     in pretraining as a linearized triple ("uncus | hypernym | hook"), never as an instruction
    unseen   in no training data fm made (the corpus's free text may still mention it: see below)
and the gap in accuracy between the two groups is what pretraining on the triples put into the weights.

Items: each held-out fact's multiple-choice instruction (its `.mc` template: the answer and n-1 distractors of
the same relation), one per fact. Matched: per (task, language) stratum the same number of seen and unseen facts
(the smaller group's count, at most per_stratum), drawn with a seed, so the two groups have the same task and
language mix and the same distractor pools. Two formats, every option scored by its log-likelihood
(fm.eval.choice):
    cloze    the pretraining format itself: <|triples|><|lang:xx|>{subject} | {relation} |  -> " {option}"
             (LAMA-style probing in the form the fact was injected)
    qa       the instruction: the chat template's prompt -> the option and <|end|> (what instruction QA scores)
Figures per format and group: accuracy (chance beside), per task group; the gap seen - unseen with a bootstrap
95% interval (groups resampled independently, seeded). `pretraining_exposure` says how often pretraining can
have drawn each seen triple: its triple tokens against the triples in the shards.

Not controlled: the free-text corpus may state a withheld fact (a poem naming a capital); a withheld fact's
other-language twin (阿富汗 | 货币 vs Afghanistan | currency) is a fact of its own and may be seen; and 2% or so
of the "seen" triples sit in pretraining's validation windows. Each makes the measured gap a lower bound.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from torch import nn

from fm.data.tokenizer import LANG_TOKENS, SPECIAL_IDS
from fm.eval.choice import continuation_logprobs
from fm.eval.icl import TASK_GROUPS as PROBE_GROUPS  # knowledge: capital, currency, language; definition: hypernym

GROUPS = ("seen", "unseen")
BOOTSTRAP = 2000


def probe_items(heldout_rows: list[dict], triples: list[dict], withheld_ids: set[str], per_stratum: int,
                seed: int = 0) -> list[dict]:
    """The matched probe set: one multiple-choice item per held-out triple fact, with `group` (seen/unseen),
    `subject` and `relation` (from the triple the fact was built from: same source_file and position).

    heldout_rows: 05_instructions/heldout.parquet rows; triples: curated triples (subject, relation,
    source_file, position); withheld_ids: the fact_ids of 05_instructions/withheld.parquet.
    """
    if per_stratum <= 0:
        return []
    tasks = {t for group in PROBE_GROUPS.values() for t in group}
    by_key = {(t["source_file"], int(t["position"])): t for t in triples}
    one_per_fact: dict[str, dict] = {}
    for row in sorted(heldout_rows, key=lambda r: (r["fact_id"], r["template_id"])):
        options = row.get("options")
        if row["task"] not in tasks or options is None or len(options) == 0 or not row["template_id"].endswith(".mc"):
            continue
        triple = by_key.get((row["source_file"], int(row["position"])))
        if triple is None or row["fact_id"] in one_per_fact:
            continue
        one_per_fact[row["fact_id"]] = {**row, "options": list(options), "answer_index": int(row["answer_index"]),
                                        "subject": triple["subject"], "relation": triple["relation"],
                                        "group": "unseen" if row["fact_id"] in withheld_ids else "seen"}
    strata: dict[tuple, dict[str, list[dict]]] = {}
    for item in one_per_fact.values():
        strata.setdefault((item["task"], item["lang"]), {g: [] for g in GROUPS})[item["group"]].append(item)
    items = []
    for (task, lang), groups in sorted(strata.items()):
        n = min(per_stratum, *(len(g) for g in groups.values()))
        for name in GROUPS:  # sorted by fact_id above, so the draw depends only on the facts and the seed
            items.extend(random.Random(f"{seed}\x00{task}\x00{lang}\x00{name}").sample(groups[name], n))
    return items


def cloze_context(tokenizer, item: dict) -> list[int]:
    """The ids before an option in the pretraining triple format: <|triples|><|lang|>subject | relation |"""
    head = [SPECIAL_IDS["<|triples|>"], SPECIAL_IDS[LANG_TOKENS.get(item["lang"], "<|lang:other|>")]]
    return head + tokenizer.encode(f"{item['subject']} | {item['relation']} |", add_special_tokens=False).ids


def cloze_pair(tokenizer, item: dict, option: str) -> tuple[list[int], list[int]]:
    """(context, continuation) ids in the pretraining triple format: <|triples|><|lang|>subject | relation | option."""
    return cloze_context(tokenizer, item), tokenizer.encode(f" {option}", add_special_tokens=False).ids


def _predictions(scores: list[float], items: list[dict]) -> list[int]:
    out, it = [], iter(scores)
    for item in items:
        lps = [next(it) for _ in item["options"]]
        out.append(max(range(len(lps)), key=lps.__getitem__))  # ties: the lowest index
    return out


def _accuracy(correct: np.ndarray) -> float | None:
    return float(correct.mean()) if len(correct) else None


def summarize(items: list[dict], predictions: list[int], seed: int = 0) -> dict:
    """Accuracy per group (and per probe group), chance, and the gap seen - unseen with a bootstrap 95% interval."""
    correct = np.array([p == item["answer_index"] for p, item in zip(predictions, items)], bool)
    group = np.array([item["group"] for item in items])
    chance = float(np.mean([1 / len(item["options"]) for item in items])) if items else None
    out: dict = {"chance": chance}
    for name in GROUPS:
        out[name] = {"n": int((group == name).sum()), "accuracy": _accuracy(correct[group == name])}
        out[name]["by_group"] = {
            probe: {"n": int(mask.sum()), "accuracy": _accuracy(correct[mask])}
            for probe, tasks in PROBE_GROUPS.items()
            if (mask := (group == name) & np.isin([item["task"] for item in items], tasks)).any()}
    seen, unseen = correct[group == "seen"], correct[group == "unseen"]
    if len(seen) and len(unseen):
        out["gap"] = float(seen.mean() - unseen.mean())
        rng = np.random.default_rng(seed)
        boot = (rng.choice(seen, (BOOTSTRAP, len(seen))).mean(1)
                - rng.choice(unseen, (BOOTSTRAP, len(unseen))).mean(1))  # (BOOTSTRAP,)
        out["gap_ci"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    else:
        out["gap"], out["gap_ci"] = None, None
    return out


def knowledge_injection(model: nn.Module, tokenizer, items: list[dict], max_len: int, batch_size: int = 32,
                        seed: int = 0, device="cpu", formats: tuple[str, ...] = ("cloze", "qa")) -> dict:
    """Score the probe items in each format; {format: summarize(...) with per-item predictions}.

    tokenizer: a tokenizers.Tokenizer (fm.data.tokenizer.open_tokenizer); the model (a Decoder, an adapter or
    fm.export.onnx.OnnxLM) already on device. Scores do not depend on batch_size (fm.eval.choice)."""
    from fm.data.chat import ChatTemplate
    from fm.eval.choice import multiple_choice

    if not items:
        raise ValueError("no probe items: the instruction set holds out no triple fact on both sides of the probe")
    out: dict = {"n": len(items)}
    if "cloze" in formats:
        pairs = [(context, tokenizer.encode(f" {o}", add_special_tokens=False).ids)
                 for item in items for context in [cloze_context(tokenizer, item)] for o in item["options"]]
        scores = [lp for lp, _ in continuation_logprobs(model, pairs, max_len, batch_size, device=device)]
        preds = _predictions(scores, items)
        out["cloze"] = {**summarize(items, preds, seed), "predictions": preds}
    if "qa" in formats:
        res = multiple_choice(model, ChatTemplate(tokenizer), items, max_len, batch_size, device=device)
        out["qa"] = {**summarize(items, res["predictions"], seed), "predictions": res["predictions"]}
    return out


def pretraining_exposure(pretrain_dir: str | Path, manifest: dict) -> dict | None:
    """How many times over pretraining can have drawn the triples: the triple tokens its batches held
    (steps x tokens per step x the triples' share of the mix among the modalities the shards hold) against
    the triple tokens in the shards. None when the run or the shards hold no triples."""
    pretrain_dir = Path(pretrain_dir)
    try:
        config = json.loads((pretrain_dir / "config.json").read_text())["pretrain"]
        summary = json.loads((pretrain_dir / "summary.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    counts = manifest.get("totals", {}).get("counts", {})
    triple_tokens = counts.get("triples", {}).get("tokens", 0)
    mix = {m: w for m, w in (config.get("mix") or {}).items() if counts.get(m, {}).get("tokens")}
    if not triple_tokens or not mix.get("triples"):
        return None
    dp = int(summary.get("layout", {}).get("dp", summary.get("world_size", 1)))
    tokens_per_step = int(config["batch_size"]) * int(config.get("grad_accum", 1)) * dp * int(config["seq_len"])
    drawn = int(summary["steps"]) * tokens_per_step * mix["triples"] / sum(mix.values())
    return {"triple_tokens": int(triple_tokens), "triple_tokens_drawn": round(drawn), "passes": round(drawn / triple_tokens, 4),
            "withheld": manifest.get("withheld")}
