"""The instruction set, FLAN style, built from the corpus's own curated records (issue 9).

    from fm.data.instructions import build_instructions
    build_instructions(Path("data/04_curated"), Path("/tmp/instr"))

Each task turns one kind of curated record into facts, and each fact into several templated
instructions (English and, where the data has Chinese, Chinese):

    hypernym          WordNet `hypernym` triples: "what is X a kind of", yes/no, multiple choice
    capital/currency/language
                      country triples (`capital`, `currency`, `language`; `货币`, `官方语言` in zh)
    caption_class     Fashion-MNIST captions ("a photo of a sneaker", "一张运动鞋的照片") -> class name
    poem_next_line    Tang poems: a line -> the line that follows it (zh)
    code_docstring    Python functions with a docstring: the function without it -> its first line

The split is by fact, never by template: a fact (`fact_id`, a hash of task, lang and subject)
lands wholly in train or wholly in held-out, so a held-out fact is never seen as an
instruction. Held-out triple facts are the knowledge-injection experiment: a share
`knowledge_probe` of them (drawn by another hash of the fact, so matched in task, language and
difficulty to the rest) is *withheld*: listed in `withheld.parquet`, whose triples the shard
stage leaves out of pretraining. A held-out fact that is not withheld was seen only as triples
in pretraining; a withheld one was seen by no stage (fm.eval.knowledge compares the two).
Multiple-choice distractors are answers of other facts of the same relation *in the same
split*, so a held-out answer is never offered as an option in train.

Not supported by the data, so not built: WordNet definitions (the sample keeps pointers, no
glosses); capitals in Chinese (no `首都` triples); class labels for clip art and emoji captions
(the caption is the only label); Chinese prompts for code (docstrings are English).

Outputs, each written atomically: `train.parquet`, `heldout.parquet`, `withheld.parquet` (one
row per withheld fact: fact_id, task, lang, subject, relation; WITHHELD_SCHEMA), `card.json`
(counts per task x language x split, and the withheld facts per task).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fm.config import InstructionsConfig
from fm.io import write_json, write_parquet
from fm.paths import Paths

INSTRUCTION_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("fact_id", pa.string(), nullable=False),
        pa.field("template_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string())),  # multiple choice only
        pa.field("answer_index", pa.int32()),  # index of the answer in options
        pa.field("source_file", pa.string()),
        pa.field("position", pa.int64()),
    ]
)

# Templates: (template_id, text). "{s}" is the subject, "{o}" the answer, "{d}" a wrong
# answer (yes/no "no" items); an id ending in "_mc" is multiple choice, its options follow it.
TEMPLATES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("hypernym", "en"): [
        ("kind_of", "What is {s} a kind of?"),
        ("complete", "Complete the sentence: {s} is a kind of"),
        ("yes", "Is {s} a kind of {o}? Answer yes or no."),
        ("no", "Is {s} a kind of {d}? Answer yes or no."),
        ("mc", "{s} is a kind of which of the following?"),
    ],
    ("capital", "en"): [
        ("what", "What is the capital of {s}?"),
        ("name", "Name the capital city of {s}."),
        ("complete", "Complete the sentence: the capital of {s} is"),
        ("mc", "Which city is the capital of {s}?"),
    ],
    ("currency", "en"): [
        ("what", "What currency is used in {s}?"),
        ("name", "Name the official currency of {s}."),
        ("complete", "Complete the sentence: the currency of {s} is"),
        ("mc", "Which of these is the currency of {s}?"),
    ],
    ("currency", "zh"): [
        ("what", "{s}使用什么货币？"),
        ("complete", "补全句子：{s}的货币是"),
        ("mc", "下列哪一项是{s}的货币？"),
    ],
    ("language", "en"): [
        ("what", "What languages are spoken in {s}?"),
        ("name", "Name the official languages of {s}."),
        ("complete", "Complete the sentence: the languages of {s} are"),
        ("mc", "Which of these is a language of {s}?"),
    ],
    ("language", "zh"): [
        ("what", "{s}的官方语言是什么？"),
        ("complete", "补全句子：{s}的官方语言是"),
        ("mc", "下列哪一项是{s}的官方语言？"),
    ],
    ("caption_class", "en"): [
        ("what", 'Which clothing class does this caption describe: "{s}"?'),
        ("label", 'Caption: "{s}"\nClass label:'),
        ("extract", 'Give the Fashion-MNIST class named in "{s}".'),
        ("mc", 'Which class does the caption "{s}" belong to?'),
    ],
    ("caption_class", "zh"): [
        ("what", "这段图片说明描述的是哪一类服饰：“{s}”？"),
        ("label", "图片说明：“{s}”\n类别："),
        ("mc", "图片说明“{s}”属于哪一类？"),
    ],
    ("poem_next_line", "zh"): [
        ("next", "續寫下一句：{s}"),
        ("what", "「{s}」的下一句是什麼？"),
        ("mc", "「{s}」的下一句是哪一句？"),
    ],
    ("code_docstring", "en"): [
        ("what", "What does this function do?\n\n{s}"),
        ("summary", "Summarize this Python function in one line.\n\n{s}"),
        ("docstring", "Write the first line of a docstring for this function.\n\n{s}"),
        ("mc", "Which line best describes this function?\n\n{s}"),
    ],
}
# task -> {lang: triple relation}
RELATIONS = {
    "hypernym": {"en": "hypernym"},
    "capital": {"en": "capital"},
    "currency": {"en": "currency", "zh": "货币"},
    "language": {"en": "language", "zh": "官方语言"},
}
ANSWER_WORDS = {"en": ("Yes", "No"), "zh": ("是", "否")}
LIST_SEPARATOR = {"en": ", ", "zh": "、"}
CAPTION_PATTERNS = {"en": re.compile(r"^a photo of (?:an? )?(.+)$"), "zh": re.compile(r"^一张(.+)的照片$")}
POEM_LINE = re.compile(r"[^，。？！；\n]+[，。？！；]")  # a clause with its closing mark
MAX_FUNCTION_CHARS = 1500  # longer functions make unreadably long prompts


WITHHELD_SCHEMA = pa.schema(
    [
        pa.field("fact_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),  # the triples (subject, relation, lang) pretraining skips
    ]
)


def _hash(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:16]


def _is_heldout(fact_id: str, fraction: float, seed: int) -> bool:
    return int(_hash(seed, fact_id), 16) / 16**16 < fraction


def _is_withheld(fact_id: str, fraction: float, seed: int) -> bool:
    """Whether a held-out triple fact is also kept out of pretraining (a hash independent of _is_heldout's)."""
    return int(_hash("knowledge-probe", seed, fact_id), 16) / 16**16 < fraction


def withheld_facts(facts: list[dict], heldout_fraction: float, knowledge_probe: float, seed: int) -> list[dict]:
    """The held-out triple facts pretraining must not see (WITHHELD_SCHEMA rows, sorted by fact_id)."""
    return sorted(({"fact_id": f["fact_id"], "task": f["task"], "lang": f["lang"], "subject": f["subject"],
                    "relation": RELATIONS[f["task"]][f["lang"]]}
                   for f in facts if f["task"] in RELATIONS and _is_heldout(f["fact_id"], heldout_fraction, seed)
                   and _is_withheld(f["fact_id"], knowledge_probe, seed)), key=lambda r: r["fact_id"])


def _fact(task, lang, subject, answers, source_file, position) -> dict:
    return {"task": task, "lang": lang, "fact_id": _hash(task, lang, subject), "subject": subject,
            "answers": answers, "source_file": source_file, "position": position}


def collect_triple_facts(triples: list[dict]) -> list[dict]:
    """Triples -> one fact per (task, lang, subject); a subject's objects, in source order, are its answers."""
    grouped: dict[tuple, dict] = {}
    for r in sorted(triples, key=lambda r: (r["source_file"], r["position"])):
        for task, by_lang in RELATIONS.items():
            if by_lang.get(r["lang"]) == r["relation"]:
                key = (task, r["lang"], r["subject"])
                if key not in grouped:
                    grouped[key] = _fact(task, r["lang"], r["subject"], [], r["source_file"], r["position"])
                fact = grouped[key]
                if r["object"] not in fact["answers"]:
                    fact["answers"].append(r["object"])
    return list(grouped.values())


def collect_caption_facts(captions: list[dict]) -> list[dict]:
    """Fashion-MNIST captions -> one fact per distinct caption; the class is the caption's noun phrase."""
    facts: dict[tuple, dict] = {}
    for r in sorted(captions, key=lambda r: (r["source_file"], r["position"])):
        pattern = CAPTION_PATTERNS.get(r["lang"])
        match = pattern.match(r["text"].strip()) if pattern and r["source"] == "fashion-mnist" else None
        if match and (r["lang"], r["text"]) not in facts:
            facts[(r["lang"], r["text"])] = _fact("caption_class", r["lang"], r["text"].strip(), [match.group(1)],
                                                  r["source_file"], r["position"])
    return list(facts.values())


def collect_poem_facts(texts: list[dict], seed: int) -> list[dict]:
    """Tang poems (`title\\nauthor\\nbody`) -> one fact per poem: a random line and the one after it."""
    facts = {}
    for r in texts:
        if r["source"] != "tang-poems":
            continue
        lines = POEM_LINE.findall("\n".join(r["text"].split("\n")[2:]))
        if len(lines) < 2:
            continue
        # the classic exercise: an opening half-line (ending in "，") -> the half that closes the couplet
        starts = [i for i in range(len(lines) - 1) if lines[i].endswith("，")] or list(range(len(lines) - 1))
        i = random.Random(_hash(seed, r["id"])).choice(starts)
        fact = _fact("poem_next_line", "zh", lines[i].strip(), [lines[i + 1].strip()], r["source_file"], r["position"])
        facts.setdefault(fact["fact_id"], fact)  # the same line in two poems is one fact
    return list(facts.values())


def _first_sentence(docstring: str) -> str:
    """The docstring's first line, carried on to the end of its sentence when it wraps."""
    paragraph = " ".join(inspect.cleandoc(docstring).split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph[: end + 1] if end >= 0 else paragraph


def collect_code_facts(code: list[dict]) -> list[dict]:
    """Python functions with a docstring -> the function without it, and the docstring's first line."""
    facts = {}
    for r in code:
        if r["lang"] != "python":
            continue
        try:
            tree = ast.parse(r["text"])
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            summary = _first_sentence(doc) if doc else ""
            if len(summary) < 10:
                continue
            node.body = node.body[1:] or [ast.Pass()]
            source = ast.unparse(node)
            if len(source) > MAX_FUNCTION_CHARS:
                continue
            prompt_code = f"```python\n{source}\n```"
            fact = _fact("code_docstring", "en", prompt_code, [summary], r["source_file"], r["position"])
            facts.setdefault(fact["fact_id"], fact)
    return list(facts.values())


def _distractors(fact: dict, pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n answers of other facts from the (sorted, unique) pool, none of them true for this fact, no repeats."""
    true = set(fact["answers"])
    if len(pool) <= 8 * (n + len(true)):  # small pool: sample exactly
        wrong = [o for o in pool if o not in true]
        return rng.sample(wrong, min(n, len(wrong)))
    picks: list[str] = []
    while len(picks) < n:  # large pool: rejection sampling terminates quickly
        o = pool[rng.randrange(len(pool))]
        if o not in true and o not in picks:
            picks.append(o)
    return picks


def render_instructions(fact: dict, pool: list[str], n_options: int, seed: int) -> list[dict]:
    """One fact -> one row per template of its task and language."""
    answer = fact["answers"][0]
    full_answer = LIST_SEPARATOR[fact["lang"]].join(fact["answers"])
    rows = []
    for template_id, text in TEMPLATES[(fact["task"], fact["lang"])]:
        rng = random.Random(_hash(seed, fact["fact_id"], template_id))
        options, answer_index, response = None, None, full_answer
        if template_id == "mc":
            options = _distractors(fact, pool, n_options - 1, rng)
            if len(options) < n_options - 1:
                continue
            answer_index = rng.randrange(n_options)
            options.insert(answer_index, answer)
            letters = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
            prompt, response = f"{text.format(s=fact['subject'])}\n{letters}", answer
        elif template_id in ("yes", "no"):
            wrong = _distractors(fact, pool, 1, rng)
            if not wrong:
                continue
            yes, no = ANSWER_WORDS[fact["lang"]]
            prompt = text.format(s=fact["subject"], o=answer, d=wrong[0])
            response = yes if template_id == "yes" else no
        else:
            prompt = text.format(s=fact["subject"])
        rows.append({"task": fact["task"], "lang": fact["lang"], "fact_id": fact["fact_id"],
                     "template_id": f"{fact['task']}.{fact['lang']}.{template_id}", "prompt": prompt,
                     "response": response, "options": options, "answer_index": answer_index,
                     "source_file": fact["source_file"], "position": fact["position"]})
    return rows


def _read(path: Path, columns: list[str]) -> list[dict]:
    return pq.read_table(path, columns=columns).to_pylist() if path.exists() else []


def build_instructions(curated_dir: Path, out_dir: Path, heldout_fraction: float = 0.1, seed: int = 0,
                       n_options: int = 4, knowledge_probe: float = 0.5) -> dict:
    """Curated tables -> train/heldout instruction tables split by fact, the withheld facts, and their card."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not 0.0 <= knowledge_probe <= 1.0:
        raise ValueError(f"knowledge_probe must be in [0, 1], got {knowledge_probe}")
    if n_options < 2:
        raise ValueError(f"n_options must be at least 2, got {n_options}")
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    common = ["id", "source", "source_file", "position", "lang", "text"]
    facts = (collect_triple_facts(_read(curated_dir / "triples.parquet", common + ["subject", "relation", "object"]))
             + collect_caption_facts(_read(curated_dir / "image_text.parquet", common))
             + collect_poem_facts(_read(curated_dir / "text.parquet", common), seed)
             + collect_code_facts(_read(curated_dir / "code.parquet", common)))

    # Distractor pools per (task, lang, split): train draws only on train answers, so a held-out
    # answer is never offered in train; held-out items may draw on every answer.
    split_of = {f["fact_id"]: "heldout" if _is_heldout(f["fact_id"], heldout_fraction, seed) else "train"
                for f in facts}
    pools: dict[tuple, list[str]] = defaultdict(list)
    for f in facts:
        pools[(f["task"], f["lang"], "heldout")].extend(f["answers"])
        if split_of[f["fact_id"]] == "train":
            pools[(f["task"], f["lang"], "train")].extend(f["answers"])
    pools = {key: sorted(set(answers)) for key, answers in pools.items()}

    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for f in sorted(facts, key=lambda f: (f["task"], f["lang"], f["fact_id"])):
        split = split_of[f["fact_id"]]
        rows[split].extend(render_instructions(f, pools.get((f["task"], f["lang"], split), []), n_options, seed))

    withheld = withheld_facts(facts, heldout_fraction, knowledge_probe, seed)
    counts: dict = {}
    for split, split_rows in rows.items():
        for r in split_rows:
            by_split = counts.setdefault(r["task"], {}).setdefault(r["lang"], {"train": 0, "heldout": 0})
            by_split[split] += 1
    card = {
        "seed": seed, "heldout_fraction": heldout_fraction, "n_options": n_options,
        "rows": {split: len(r) for split, r in rows.items()},
        "facts": {split: sum(s == split for s in split_of.values()) for split in rows},
        "knowledge_probe": knowledge_probe,
        "withheld": {task: sum(w["task"] == task for w in withheld) for task in RELATIONS},
        "counts": counts,
        "templates": {f"{task}.{lang}": [t for t, _ in ts] for (task, lang), ts in TEMPLATES.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        table = pa.Table.from_pylist(split_rows, schema=INSTRUCTION_SCHEMA)
        write_parquet(table, out_dir / f"{split}.parquet")
    write_parquet(pa.Table.from_pylist(withheld, schema=WITHHELD_SCHEMA), out_dir / "withheld.parquet")
    write_json(card, out_dir / "card.json")
    return card


def instructions(cfg: InstructionsConfig, paths: Paths) -> dict:
    """The instructions stage: build the set from `paths.curated` into `paths.instructions`."""
    start = time.perf_counter()
    if not any((paths.curated / f"{m}.parquet").exists() for m in ("triples", "image_text", "text", "code")):
        raise FileNotFoundError(f"no curated tables in {paths.curated}: run `fm curate` first")
    card = build_instructions(paths.curated, paths.instructions, cfg.heldout_fraction, cfg.seed, cfg.n_options,
                              cfg.knowledge_probe)
    if not card["rows"]["train"]:
        raise ValueError(f"instructions: the curated tables in {paths.curated} hold no record any task can use "
                         f"(WordNet hypernyms, country capitals/currencies/languages, class captions, poems, "
                         f"Python functions with docstrings)")
    return {"stage": "instructions", "rows": card["rows"], "facts": card["facts"], "withheld": card["withheld"],
            "tasks": {task: sum(c["train"] + c["heldout"] for c in langs.values()) for task, langs in card["counts"].items()},
            "outputs": [str(paths.instructions)], "seconds": round(time.perf_counter() - start, 3)}
