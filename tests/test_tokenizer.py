"""The tokenize stage: a tiny BPE trained on a mixed en/zh/code fixture round-trips text and keeps
the documented special-token ids.

    pytest tests/test_tokenizer.py
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from fm.config import TokenizeConfig
from fm.data.schema import SCHEMAS, content_id
from fm.data.tokenizer import SPECIAL_TOKENS, lang_token, train_tokenizer
from fm.paths import Paths

EN = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "A foundation model is trained on broad data at scale and adapted to many downstream tasks.",
    "Tokenizers split text into pieces; the pieces are mapped to integer ids for the model.",
]
ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
CODE = ["def add(a, b):\n    return a + b\n", "int main(void) {\n\treturn 0;\n}\n", "for i in range(10):\n    print(i * i)\n"]


def curated_table(modality: str, docs: list[tuple[str, str]]) -> pa.Table:
    """(text, lang) pairs -> a table in the modality's curated schema."""
    rows = [{"id": content_id(modality, t), "modality": modality, "source": f"fixture-{lang}", "source_file": f"{modality}/f.jsonl",
             "position": i + 1, "lang": lang, "text": t, "n_bytes": len(t.encode()), "meta": "{}"}
            for i, (t, lang) in enumerate(docs)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS[modality])


def write_fixture(workdir: Path, repeat: int = 5) -> Paths:
    paths = Paths(raw=workdir / "01_raw", workdir=workdir)
    paths.curated.mkdir(parents=True)
    # Repeated with a counter so the docs differ (distinct ids) but share enough pairs to merge.
    text = [(f"{t} ({k})", "en") for k in range(repeat) for t in EN] + [(f"{t}{k}", "zh") for k in range(repeat) for t in ZH]
    code = [(f"# {k}\n{c}", "python") for k in range(repeat) for c in CODE]
    pq.write_table(curated_table("text", text), paths.curated / "text.parquet")
    pq.write_table(curated_table("code", code), paths.curated / "code.parquet")
    return paths


@pytest.fixture
def trained(tmp_path):
    paths = write_fixture(tmp_path / "data")
    summary = train_tokenizer(TokenizeConfig(vocab_size=300, min_frequency=2), paths)
    return paths, summary


def test_special_tokens_have_documented_ids_and_are_single_tokens(trained):
    paths, _ = trained
    tok = Tokenizer.from_file(str(paths.tokens / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
        assert tok.encode(token).ids == [i]
        assert tok.decode([i], skip_special_tokens=False) == token
    # Inside text too, e.g. an instruction prompt built from strings.
    ids = tok.encode("<|user|>hi<|end|><|assistant|>").ids
    assert ids[0] == SPECIAL_TOKENS.index("<|user|>") and ids[-1] == SPECIAL_TOKENS.index("<|assistant|>")


@pytest.mark.parametrize("text", EN + ZH + CODE + [
    "unseen: 한국어, emoji 😀, math 𝕏, tabs\t\tand  double  spaces\n",
    "  leading and trailing spaces  ",
    "cafe\u0301 (decomposed é is NFC-normalized)",
])
def test_round_trip(trained, text):
    paths, _ = trained
    tok = Tokenizer.from_file(str(paths.tokens / "tokenizer.json"))
    ids = tok.encode(text).ids
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert len(ids) < len(text.encode())  # merges were learned and used (compresses below 1 byte/token)


def test_summary_and_vocab(trained):
    paths, summary = trained
    tok = Tokenizer.from_file(str(paths.tokens / "tokenizer.json"))
    assert summary["stage"] == "tokenize"
    assert summary["vocab_size"] == tok.get_vocab_size() == 300
    assert summary["outputs"] == [str(paths.tokens / "tokenizer.json")]
    assert set(summary["bytes_per_token"]) == {"text", "code"}
    assert all(v > 1.0 for v in summary["bytes_per_token"].values())
    n_bytes = sum(len(t.encode()) for f in ("text", "code") for t in pq.read_table(paths.curated / f"{f}.parquet")["text"].to_pylist())
    assert summary["train_bytes"] == n_bytes


def test_training_is_deterministic_and_respects_the_byte_cap(tmp_path):
    a = write_fixture(tmp_path / "a")
    b = write_fixture(tmp_path / "b")
    cfg = TokenizeConfig(vocab_size=300, min_frequency=2, max_train_bytes=1500)
    sa, sb = train_tokenizer(cfg, a), train_tokenizer(cfg, b)
    assert 0 < sa["train_bytes"] <= 1500
    assert sa["train_docs"] == sb["train_docs"]
    assert (a.tokens / "tokenizer.json").read_bytes() == (b.tokens / "tokenizer.json").read_bytes()


def test_missing_curated_tables_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fm curate"):
        train_tokenizer(TokenizeConfig(vocab_size=300), Paths(raw=tmp_path, workdir=tmp_path / "data"))


def test_vocab_too_small_for_bytes_and_specials(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TokenizeConfig(vocab_size=100), write_fixture(tmp_path / "data"))


def test_lang_token():
    assert lang_token("en") == lang_token("EN-us") == "<|lang:en|>"
    assert lang_token("zh") == lang_token("zh_Hans") == "<|lang:zh|>"
    assert lang_token("python") == lang_token(None) == lang_token("") == "<|lang:other|>"


def test_fm_loaders_never_match_special_tokens_in_text(tmp_path):
    """A literal control token in a document or a prompt stays text, whichever fm loader opened the tokenizer."""
    from tokenizers import models

    from fm.data.tokenizer import SPECIAL_IDS, open_tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.add_special_tokens(list(SPECIAL_IDS))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = "<|endoftext|>"
    assert Tokenizer.from_file(str(path)).encode(text).ids == [SPECIAL_IDS[text]]  # what a plain load does
    assert SPECIAL_IDS[text] not in open_tokenizer(path).encode(text).ids


@pytest.mark.parametrize("budget", [10**9, 2000])
def test_the_training_sample_is_the_same_read_in_tiny_batches(tmp_path, monkeypatch, budget):
    """select_training_text streams the curated tables (ids and lengths first, then the picked texts): a batch of
    two rows gives the sample of one batch per file, text for text and in the same order."""
    import fm.data.schema as schema
    import fm.data.tokenizer as tokenizer

    paths = write_fixture(tmp_path / "data")
    whole = tokenizer.select_training_text(paths, budget)
    monkeypatch.setattr(schema, "rows_per_batch", lambda path: 2)  # read_batches' default
    assert tokenizer.select_training_text(paths, budget) == whole
    assert sum(len(t.encode()) for texts in whole.values() for t in texts) <= budget
    if budget == 2000:  # the cap bites: a strict subset, taken in content-id order across modalities
        assert 0 < sum(map(len, whole.values())) < sum(pq.read_metadata(p).num_rows for p in paths.curated.glob("*.parquet"))
