"""Curate: exact dedup, quality filters, MinHash near-dup against exact Jaccard, stats, invariants.

Small tables built here with pyarrow; CPU, seconds.
"""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fm.data.curate as curate_module
import fm.data.schema as schema_module
from fm.config import CurateConfig
from fm.data.curate import (
    curate,
    exact_near_duplicates,
    find_near_duplicates,
    is_unspaced,
    quality_reason,
    shingle_hashes,
)
from fm.data.quarantine import read_quarantine, write_quarantine
from fm.data.schema import QUARANTINE_SCHEMA, SCHEMAS, content_id
from fm.paths import Paths

CFG = CurateConfig()


def words(rng: random.Random, n: int) -> list[str]:
    """n random lowercase words from a space so large that two drawn texts share no 5-gram."""
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]


def chinese(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n))


def replace_words(text: str, rng: random.Random, count: int) -> str:
    tokens = text.split()
    for position in rng.sample(range(len(tokens)), count):
        tokens[position] = "zz" + tokens[position]
    return " ".join(tokens)


def make_table(modality: str, texts: list[str], langs: list[str] | None = None, source: str = "demo") -> pa.Table:
    rows = []
    for position, text in enumerate(texts, start=1):
        row = dict.fromkeys(SCHEMAS[modality].names)
        row.update(id=content_id(modality, text), modality=modality, source=source, source_file=f"{modality}/a.jsonl",
                   position=position, lang=(langs or ["en"] * len(texts))[position - 1], text=text,
                   n_bytes=len(text.encode()), meta="{}")  # fmt: skip
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMAS[modality])


def write_validated(paths: Paths, tables: dict[str, pa.Table]) -> None:
    paths.validated.mkdir(parents=True, exist_ok=True)
    for modality, table in tables.items():
        pq.write_table(table, paths.validated / f"{modality}.parquet")


def python_shingles(text: str, k: int) -> set[tuple[str, ...]]:
    """The shingle definition written plainly: the reference the numpy hashing must agree with."""
    text = text.lower()
    tokens = list("".join(text.split())) if is_unspaced(text) else text.split()
    if len(tokens) < k:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


def brute_force_near_duplicates(texts: list[str], cfg: CurateConfig) -> set[int]:
    """Removed = Jaccard >= threshold with an earlier kept document, over all pairs, Python sets."""
    sets = [python_shingles(t, cfg.shingle_size) for t in texts]
    kept: list[int] = []
    removed = set()
    for i, s in enumerate(sets):
        if s and any(len(s & sets[j]) / len(s | sets[j]) >= cfg.jaccard_threshold for j in kept):
            removed.add(i)
        elif s:
            kept.append(i)
    return removed


# --- shingles ----------------------------------------------------------------------------------


def test_shingle_hashes_agree_with_python_shingles():
    rng = random.Random(1)
    vocabulary = words(rng, 40) + ["Straße", "É", "naïve"]
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(0, 30))) for _ in range(200)]
    texts += ["", "   ", "a b", "Hello\u00a0WORLD\u3000foo\tbar\n", chinese(rng, 12), "今天 天气很好，我们去公园"]
    hashes, offsets = shingle_hashes(texts, 3)
    for d, text in enumerate(texts):
        doc_hashes = set(hashes[offsets[d] : offsets[d + 1]].tolist())
        reference = python_shingles(text, 3)
        assert len(doc_hashes) == len(reference), text
        if not is_unspaced(text):  # each shingle, hashed on its own, is one of the document's hashes
            alone = {shingle_hashes([" ".join(shingle)], 3)[0][0] for shingle in reference}
            assert alone == doc_hashes
    # different shingles hash apart (64-bit hashes: no collision expected at this size)
    assert len(set(hashes.tolist())) == len(set().union(*(python_shingles(t, 3) for t in texts)))


def test_unspaced_detection():
    assert is_unspaced("今天天气很好，我们去公园散步。")
    assert is_unspaced("今天天气很好，我们去公园散步和吃饭 and some English 然后回家休息一下吧")
    assert not is_unspaced("plain English text")
    assert not is_unspaced("café crème brûlée")


# --- near duplicates against the truth ---------------------------------------------------------


def test_one_word_changed_is_near_duplicate_distinct_doc_kept():
    rng = random.Random(2)
    original = " ".join(words(rng, 200))
    texts = [original, replace_words(original, rng, 1), " ".join(words(rng, 200))]
    found = find_near_duplicates(texts, CFG)
    assert set(found) == {1}
    kept, similarity = found[1]
    assert kept == 0 and similarity == pytest.approx(191 / 201)  # 5 of 196 shingles changed


def test_chinese_near_duplicate_found_with_character_shingles():
    rng = random.Random(3)
    original = chinese(rng, 300)
    edited = original[:150] + "猫" + original[151:]
    texts = [original, edited, chinese(rng, 300)]
    assert set(find_near_duplicates(texts, CFG)) == {1}
    # without character shingles each document would be one "word": no overlap at all
    assert len(python_shingles(original, 5)) == 296


def test_removals_equal_exact_jaccard_truth():
    """Variants with a known number of edited words: Jaccard far above or below the threshold,
    and a band around it. The exact reference must match brute force exactly; MinHash LSH
    (whose candidates are confirmed exactly) must match it on the clear cases and stay close."""
    rng = random.Random(4)
    texts, clear_duplicates, clear_distinct = [], set(), set()
    for _ in range(40):
        base = " ".join(words(rng, 150))
        texts.append(base)
        for edits in (1, 3, 12, 40):  # Jaccard about 0.94, 0.82, 0.49, 0.13 (5-gram shingles)
            texts.append(replace_words(base, rng, edits))
            (clear_duplicates if edits == 1 else clear_distinct if edits >= 12 else set()).add(len(texts) - 1)
    truth = brute_force_near_duplicates(texts, CFG)
    assert set(exact_near_duplicates(texts, CFG)) == truth
    found = set(find_near_duplicates(texts, CFG))
    assert clear_duplicates <= found and not (found & clear_distinct)
    # LSH catches a 0.81 pair with probability 1 - (1 - 0.81**8)**16 = 0.97: expect about one miss
    assert abs(len(found) - len(truth)) <= 5
    assert len(truth) >= 60


def test_two_processes_give_the_same_result_as_one(monkeypatch):
    monkeypatch.setattr(curate_module, "_CHUNK_CHARS", 20_000)  # several chunks, so the pool is used
    rng = random.Random(5)
    bases = [" ".join(words(rng, 300)) for _ in range(30)]
    texts = bases + [replace_words(b, rng, 2) for b in bases]
    one = find_near_duplicates(texts, CFG, processes=1)
    two = find_near_duplicates(texts, CFG, processes=2)
    assert one == two and len(one) == 30


def test_only_the_screened_candidates_shingles_are_read_and_nothing_changes(monkeypatch):
    """Shingle sets are made only for candidates some pair of which passes the MinHash screen; a bucket too big to
    screen pair by pair gives all its members theirs. Neither may change what is found."""
    rng = random.Random(6)
    bases = [" ".join(words(rng, 200)) for _ in range(40)]
    others = [" ".join(words(rng, 200)) for _ in range(150)]  # each with a copy at Jaccard ~0.5: some collide in
    texts = bases + [replace_words(b, rng, 2) for b in bases] + others + [replace_words(b, rng, 14) for b in others]
    made = []  # a band (candidates), few pass the screen
    real = curate_module.shingle_sets
    monkeypatch.setattr(curate_module, "shingle_sets", lambda t, k: made.append(len(t)) or real(t, k))
    screened = find_near_duplicates(texts, CFG, processes=1)
    assert sorted(screened) == list(range(40, 80))
    assert sum(made) == 88  # the 80 near-copies, and the candidates of 4 pairs near 0.5 the estimate let through
    made.clear()
    monkeypatch.setattr(curate_module, "_BIG_BUCKET", 1)  # every bucket "big": no pair screened
    assert find_near_duplicates(texts, CFG, processes=1) == screened
    assert sum(made) == 122  # every candidate


# --- quality filters ---------------------------------------------------------------------------


def test_quality_filters():
    assert quality_reason("too short", CFG) == "too_short"
    assert quality_reason("   padded    \n\n   ", CFG) == "too_short"
    assert quality_reason("a sentence long enough to keep, with punctuation.", CFG) is None
    assert quality_reason("def f(x):\n    return {'a': [x, x + 1]}\n", CFG) is None
    assert quality_reason("=~=~=~=~=~=~ ok ~=~=~=~=~=~=~=~=", CFG) == "symbol_ratio 0.88 > 0.50"  # 28 of 32
    assert quality_reason("今天天气很好，我们去公园散步。", CurateConfig(min_chars=4)) is None


# --- the stage ---------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(6)
    original = " ".join(words(rng, 200))
    zh = chinese(rng, 120)
    text = [
        original,
        original,  # exact duplicate of row 1
        replace_words(original, rng, 1),  # near duplicate of row 1
        " ".join(words(rng, 200)),
        "tiny",  # too short
        "#!@$%^&*()_+{}|:<>?~`-=[]\\;',./ " * 3,  # symbols
        zh,
        zh[:60] + "猫" + zh[61:],  # Chinese near duplicate
    ]
    langs = ["en"] * 6 + ["zh", "zh"]
    code = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b\n", "x=1"]
    captions = ["a cat", "a cat", "a dog"]  # short, but captions are exempt from the filters
    paths = Paths(raw=tmp_path / "raw", workdir=tmp_path / "work")
    write_validated(paths, {"text": make_table("text", text, langs), "code": make_table("code", code, ["python"] * 3),
                            "image_text": make_table("image_text", captions)})  # fmt: skip
    previous = [{"modality": "text", "source_file": "text/bad.jsonl", "position": 3, "stage": "ingest",
                 "reason": "bad UTF-8"}]  # fmt: skip
    write_quarantine(QUARANTINE_SCHEMA.empty_table(), previous, paths.validated / "quarantine.parquet")
    return paths, text


def test_curate_stage(corpus):
    paths, text = corpus
    summary = curate(CFG, paths)
    counts = summary["counts"]
    assert counts["text"] == {"in": 8, "kept": 3, "quarantined": 5, "exact_duplicate": 1, "near_duplicate": 2,
                              "too_short": 1, "symbol_ratio": 1}  # fmt: skip
    assert counts["code"] == {"in": 3, "kept": 1, "quarantined": 2, "exact_duplicate": 1, "near_duplicate": 0,
                              "too_short": 1, "symbol_ratio": 0}  # fmt: skip
    assert counts["image_text"]["kept"] == 2 and counts["image_text"]["exact_duplicate"] == 1
    for c in counts.values():
        assert c["in"] == c["kept"] + c["quarantined"]

    kept = pq.read_table(paths.curated / "text.parquet")
    assert kept.schema == SCHEMAS["text"]
    assert kept["text"].to_pylist() == [text[0], text[3], text[6]]

    quarantine = read_quarantine(paths.quarantine)
    assert quarantine["stage"].to_pylist()[0] == "ingest"  # the earlier stages' rows are kept
    rows = {(r["modality"], r["position"]): r for r in quarantine.to_pylist() if r["stage"] == "curate"}
    first_id, zh_id = content_id("text", text[0]), content_id("text", text[6])
    assert rows["text", 2]["reason"] == "exact_duplicate" and rows["text", 2]["duplicate_of"] == first_id
    assert rows["text", 3]["reason"].startswith("near_duplicate jaccard 0.9")
    assert rows["text", 3]["duplicate_of"] == first_id
    assert rows["text", 8]["duplicate_of"] == zh_id
    assert rows["text", 5]["reason"] == "too_short" and rows["text", 5]["duplicate_of"] is None
    assert rows["text", 6]["reason"].startswith("symbol_ratio")
    assert len(rows) == sum(c["quarantined"] for c in counts.values())


def test_curate_stats_parquet_and_duckdb(corpus):
    from fm.registry import refresh

    paths, text = corpus
    summary = curate(CFG, paths)
    assert refresh(paths, ["curate"]) == ["corpus_stats"]  # the registry table is rebuilt from stats.parquet
    stats = {(r["modality"], r["lang"]): r for r in pq.read_table(paths.curated / "stats.parquet").to_pylist()}
    en, zh = stats["text", "en"], stats["text", "zh"]
    assert (en["docs_in"], en["docs"], en["docs_removed"], en["duplicates_removed"]) == (6, 2, 4, 2)
    assert en["words"] == 400 and en["bytes"] == len(text[0].encode()) + len(text[3].encode())
    assert zh["words"] == 120  # Chinese: characters, not whitespace tokens
    assert zh["dedup_rate"] == 0.5
    con = duckdb.connect(str(paths.duckdb))
    try:
        in_db = con.sql("SELECT * FROM corpus_stats ORDER BY modality, lang, source").to_arrow_table().to_pylist()
    finally:
        con.close()
    assert in_db == sorted(summary["stats"], key=lambda r: (r["modality"], r["lang"], r["source"]))
    curate(CFG, paths)  # a rerun replaces the rows rather than adding to them
    refresh(paths, ["curate"])
    con = duckdb.connect(str(paths.duckdb))
    try:
        assert con.execute("SELECT count(*) FROM corpus_stats").fetchone()[0] == len(in_db)
    finally:
        con.close()


def test_curate_is_deterministic(corpus, tmp_path):
    paths, _ = corpus
    curate(CFG, paths)
    first = {name: pq.read_table(paths.curated / name) for name in ("text.parquet", "code.parquet", "stats.parquet")}
    first_quarantine = read_quarantine(paths.quarantine)
    curate(CFG, paths)
    for name, table in first.items():
        assert pq.read_table(paths.curated / name).equals(table)
    assert read_quarantine(paths.quarantine).equals(first_quarantine)


def test_curate_without_validated_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fm validate` first"):
        curate(CFG, Paths(workdir=tmp_path))


def test_curate_streams_and_gives_the_same_outputs_in_tiny_batches(corpus, monkeypatch):
    """curate reads its input a batch at a time (ids and quality, band keys, the candidates' texts, the output): a
    batch of one row gives the tables, statistics and quarantine of one batch per file, and the output is written
    a row group per batch."""
    import fm.data.curate as curate_module

    paths, _ = corpus
    curate(CFG, paths)
    expected = {f.name: pq.read_table(f).to_pylist() for f in sorted(paths.curated.glob("*.parquet"))}
    quarantine = read_quarantine(paths.quarantine).to_pylist()
    monkeypatch.setattr(schema_module, "rows_per_batch", lambda path: 1)  # read_batches' default
    curate(CFG, paths)
    assert {f.name: pq.read_table(f).to_pylist() for f in sorted(paths.curated.glob("*.parquet"))} == expected
    assert read_quarantine(paths.quarantine).to_pylist() == quarantine
    assert pq.ParquetFile(paths.curated / "text.parquet").metadata.num_row_groups == 8  # one per input row


def test_ids_become_keys_that_sort_as_the_strings_and_first_rows_match_a_dict():
    import numpy as np

    from fm.data.curate import first_of_each_id
    from fm.data.schema import id_keys

    rng = random.Random(5)
    distinct = [content_id("text", str(i)) for i in range(300)] + ["0" * 32, "f" * 32, "0" * 31 + "1"]
    ids = [rng.choice(distinct) for _ in range(1000)]
    hi, lo = id_keys(pa.chunked_array([ids[:400], ids[400:]]))  # across chunks
    assert [(int(h) << 64) | int(l) for h, l in zip(hi, lo)] == [int(s, 16) for s in ids]
    assert [ids[i] for i in np.lexsort((lo, hi))] == sorted(ids)
    first: dict[str, int] = {}
    expected = [(row, first.setdefault(s, row)) for row, s in enumerate(ids) if first.setdefault(s, row) != row]
    assert first_of_each_id(hi, lo) == expected
    assert first_of_each_id(*id_keys(pa.array([], pa.string()))) == []
    assert id_keys(pa.array(ids).slice(7, 3))[1].tolist() == [int(s, 16) & (2**64 - 1) for s in ids[7:10]]
    for bad in ("abc", "A" * 32, "g" * 32, None):
        with pytest.raises(ValueError, match="not 32 lowercase hex digits"):
            id_keys(pa.array(ids[:3] + [bad], pa.string()))


def test_curate_names_the_file_with_an_id_that_is_not_a_content_id(tmp_path):
    paths = Paths(tmp_path / "raw", tmp_path / "work")
    table = make_table("text", [f"document {i} with enough words in it to be kept" for i in range(3)])
    ids = table["id"].to_pylist()
    ids[1] = "not-a-content-id"
    write_validated(paths, {"text": table.set_column(0, "id", pa.array(ids, pa.string()))})
    with pytest.raises(ValueError, match=r"text\.parquet: id 'not-a-content-id' is not 32 lowercase hex"):
        curate(CurateConfig(), paths)
