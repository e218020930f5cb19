"""The shard stage: token shards decode back to the curated documents, the manifest's counts and
sha256 match the files, runs are deterministic and an interrupted run leaves nothing that looks done.

    pytest tests/test_shards.py
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer

import fm.data.shards as shards
from fm.config import ShardConfig, TokenizeConfig
from fm.data.schema import SCHEMAS, content_id
from fm.data.shards import load_manifest, read_index, read_token_shard, token_dtype, write_shards
from fm.data.tokenizer import SPECIAL_IDS, load_tokenizer, train_tokenizer
from fm.paths import Paths

EN = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "A foundation model is trained on broad data at scale and adapted to many downstream tasks.",
    "Literal control strings stay text: <|endoftext|> and <|user|> are just bytes here.",
]
ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
CODE = ["def add(a, b):\n    return a + b\n", "int main(void) {\n\treturn 0;\n}\n"]
CAPTIONS = [("a red square", "en", (200, 30, 30)), ("一个蓝色的正方形", "zh", (20, 20, 220)), ("a green square", "en", (20, 200, 20))]
TRIPLES = [("Paris", "capital of", "France", "en"), ("Paris", "located in", "Europe", "en"), ("dog", "hypernym", "canine", "en"),
           ("巴黎", "首都", "法国", "zh"), ("Paris", "population", "2.1 million", "en")]


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def rows(modality: str, items: list[dict]) -> pa.Table:
    out = []
    for i, item in enumerate(items):
        base = {"id": content_id(modality, item["text"]), "modality": modality, "source": item.pop("source", f"{modality}-src"),
                "source_file": f"{modality}/f.jsonl", "position": i + 1, "n_bytes": len(item["text"].encode()), "meta": "{}"}
        out.append(base | item)
    return pa.Table.from_pylist(out, schema=SCHEMAS[modality])


def write_curated(workdir: Path) -> Paths:
    paths = Paths(raw=workdir / "01_raw", workdir=workdir)
    paths.curated.mkdir(parents=True)
    text = [{"text": f"{t} #{k}", "lang": "en", "source": "web-en"} for k in range(4) for t in EN]
    text += [{"text": f"{t}{k}", "lang": "zh", "source": "web-zh"} for k in range(4) for t in ZH]
    text.append({"text": "cafe\u0301 au lait, decomposed", "lang": None, "source": None})  # nulls and NFC
    pq.write_table(rows("text", text), paths.curated / "text.parquet")
    pq.write_table(rows("code", [{"text": f"# v{k}\n{c}", "lang": "python" if "def" in c else "c"} for k in range(3) for c in CODE]),
                   paths.curated / "code.parquet")
    pq.write_table(rows("image_text", [{"text": c, "lang": lang, "image": png(rgb), "image_width": 8, "image_height": 8}
                                       for c, lang, rgb in CAPTIONS]), paths.curated / "image_text.parquet")
    pq.write_table(rows("triples", [{"text": f"{s} | {r} | {o}", "lang": lang, "subject": s, "relation": r, "object": o}
                                    for s, r, o, lang in TRIPLES]), paths.curated / "triples.parquet")
    train_tokenizer(TokenizeConfig(vocab_size=320, min_frequency=2), paths)
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One corpus sharded with a tiny shard size, so documents get cut across shard boundaries."""
    paths = write_curated(tmp_path_factory.mktemp("shards") / "data")
    cfg = ShardConfig(tokens_per_shard=64, docs_per_arrow_shard=4, triples_per_document=2, seed=3)
    summary = write_shards(cfg, paths)
    return paths, cfg, summary


def read_arrow(path: Path) -> pa.Table:
    with ipc.open_file(path) as f:
        return f.read_all()


def test_manifest_token_counts_equal_the_memmaps(built):
    paths, cfg, summary = built
    out = paths.tokens / "shards"
    manifest = load_manifest(out)
    token_entries = [e for e in manifest["shards"] if e["kind"] == "tokens"]
    per_modality = {}
    for e in token_entries:
        tokens = read_token_shard(out / e["path"])
        index = read_index(out / e["path"].replace(".bin", ".idx.npy"))
        assert tokens.dtype == np.dtype("<u2") and e["dtype"] == "<u2"
        assert len(tokens) == e["tokens"] <= cfg.tokens_per_shard
        # the spans tile the shard: contiguous, no gaps, no overlap
        assert index["start"][0] == 0 and np.all(index["start"][1:] == index["start"][:-1] + index["length"][:-1])
        assert index["start"][-1] + index["length"][-1] == len(tokens)
        assert sum(e["token_mix"]["source"].values()) == len(tokens)
        per_modality[e["modality"]] = per_modality.get(e["modality"], 0) + len(tokens)
    assert per_modality == {m: c["tokens"] for m, c in summary["counts"].items()}
    assert manifest["totals"]["tokens"] == sum(per_modality.values()) == summary["tokens"]
    assert summary["shards"] == len(token_entries) > 4  # tiny shards: several per modality
    assert manifest["tokenizer"]["vocab_size"] == 320
    assert all(len(read_token_shard(out / e["path"])) == cfg.tokens_per_shard for e in token_entries
               if e["path"] != max(x["path"] for x in token_entries if x["modality"] == e["modality"]))


def test_documents_decode_back_from_the_index(built):
    paths, cfg, summary = built
    out = paths.tokens / "shards"
    manifest = load_manifest(out)
    tok = Tokenizer.from_file(str(paths.tokens / "tokenizer.json"))
    codes = manifest["codes"]
    # Reassemble each document from its spans (a document cut by a boundary continues in the next shard).
    docs: dict[tuple[str, int], list[int]] = {}
    meta = {}
    for e in sorted((e for e in manifest["shards"] if e["kind"] == "tokens"), key=lambda e: e["path"]):
        tokens = read_token_shard(out / e["path"])
        for row in read_index(out / e["path"].replace(".bin", ".idx.npy")):
            key = (codes["modality"][row["modality"]], int(row["doc"]))
            docs.setdefault(key, []).extend(tokens[row["start"]:row["start"] + row["length"]].tolist())
            meta[key] = (codes["source"][row["source"]], codes["lang"][row["lang"]])
    assert len(docs) == manifest["totals"]["documents"] == sum(c["docs"] for c in summary["counts"].values())

    for modality in ("text", "code", "image_text", "triples"):
        table = pa.concat_tables(read_arrow(out / e["path"]) for e in manifest["shards"]
                                 if e["kind"] == "docs" and e["modality"] == modality)
        expected: dict[int, list] = {}
        for r in table.to_pylist():
            expected.setdefault(r["doc"], []).append(r)
        assert sorted(expected) == list(range(summary["counts"][modality]["docs"]))
        for doc, members in expected.items():
            text = "\n".join(r["text"] for r in members)  # triples: a paragraph of facts, one per line
            lang = members[0]["lang"]
            lang_tok = {"en": "<|lang:en|>", "zh": "<|lang:zh|>"}.get(lang, "<|lang:other|>")
            ids = docs[(modality, doc)]
            assert tok.decode(ids, skip_special_tokens=False) == f"<|{modality}|>{lang_tok}{unicodedata.normalize('NFC', text)}<|endoftext|>"
            assert meta[(modality, doc)] == (members[0]["source"] or "", lang or "")
            # exactly one control token pair + end: literal "<|endoftext|>" in text did not become id 0
            assert ids.count(SPECIAL_IDS["<|endoftext|>"]) == 1 and ids[-1] == SPECIAL_IDS["<|endoftext|>"]
    # triples of one subject are grouped, at most triples_per_document per paragraph
    triples = pa.concat_tables(read_arrow(out / e["path"]) for e in manifest["shards"] if e["kind"] == "docs" and e["modality"] == "triples")
    per_doc = {}
    for r in triples.to_pylist():
        per_doc.setdefault(r["doc"], set()).add(r["subject"])
        assert sum(1 for x in triples["doc"].to_pylist() if x == r["doc"]) <= cfg.triples_per_document
    assert all(len(s) == 1 for s in per_doc.values()) and len(per_doc) == 4  # Paris(3 -> 2+1), dog, 巴黎


def test_image_shards_carry_the_image_bytes(built):
    paths, _, _ = built
    out = paths.tokens / "shards"
    manifest = load_manifest(out)
    images = pa.concat_tables(read_arrow(out / e["path"]) for e in manifest["shards"] if e["kind"] == "images")
    curated = pq.read_table(paths.curated / "image_text.parquet")
    assert sorted(zip(images["text"].to_pylist(), images["image"].to_pylist())) == sorted(zip(curated["text"].to_pylist(), curated["image"].to_pylist()))
    docs = [e for e in manifest["shards"] if e["kind"] == "docs" and e["modality"] == "image_text"]
    assert "image" not in read_arrow(out / docs[0]["path"]).column_names  # the light copy for text use


def test_sha256_in_manifest_matches_files(built, tmp_path):
    paths, _, _ = built
    out = paths.tokens / "shards"
    manifest = load_manifest(out, verify=True)
    assert {e["kind"] for e in manifest["shards"]} == {"tokens", "index", "docs", "images"}
    assert sorted(e["path"] for e in manifest["shards"]) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    # a corrupted copy fails verification
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    first = copy / manifest["shards"][0]["path"]
    data = bytearray(first.read_bytes())
    data[0] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_manifest(copy, verify=True)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without_shard_list(path: Path) -> None:
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "shards"}))


def _entry_without_path(path: Path) -> None:
    manifest = json.loads(path.read_text())
    del manifest["shards"][1]["path"]
    path.write_text(json.dumps(manifest))


def _not_utf8(path: Path) -> None:
    path.write_bytes(b'{"shards": "\xc3\x28"}')  # an invalid UTF-8 sequence


@pytest.mark.parametrize("damage, what", [(_cut_short, "is not valid JSON"), (_not_utf8, "is not valid JSON"),
                                          (_without_shard_list, 'lacks its list of shards ("shards")'),
                                          (_entry_without_path, "shard entry 1 lacks path")])
def test_a_damaged_manifest_is_a_value_error_naming_it(built, tmp_path, damage, what):
    """Not a JSONDecodeError or KeyError without a path: the file, what is wrong with it, and the stage to rerun."""
    paths, _, _ = built
    copy = tmp_path / "shards"
    shutil.copytree(paths.tokens / "shards", copy)
    damage(copy / "manifest.json")
    for verify in (False, True):
        with pytest.raises(ValueError) as info:
            load_manifest(copy, verify=verify)
        assert type(info.value) is ValueError
        message = str(info.value)
        assert message.startswith(str(copy / "manifest.json")) and what in message, message
        assert message.endswith("rerun `fm shard`"), message


def test_deterministic_across_runs(built, tmp_path):
    paths, cfg, _ = built
    other = Paths(raw=tmp_path, workdir=tmp_path / "data")
    other.curated.mkdir(parents=True)
    # same content, rows in a different file order: the output must not depend on it
    for f in paths.curated.iterdir():
        t = pq.read_table(f)
        pq.write_table(t.take(np.arange(t.num_rows)[::-1]), other.curated / f.name)
    other.tokens.mkdir(parents=True)
    (other.tokens / "tokenizer.json").write_bytes((paths.tokens / "tokenizer.json").read_bytes())
    write_shards(cfg, other)
    assert (other.tokens / "shards" / "manifest.json").read_text() == (paths.tokens / "shards" / "manifest.json").read_text()
    # another seed: same totals, another order
    write_shards(ShardConfig(tokens_per_shard=64, docs_per_arrow_shard=4, triples_per_document=2, seed=4), other)
    m3 = load_manifest(other.tokens / "shards")
    m1 = load_manifest(paths.tokens / "shards")
    assert m3["totals"]["counts"] == m1["totals"]["counts"]
    assert [e["sha256"] for e in m3["shards"]] != [e["sha256"] for e in m1["shards"]]


def test_interrupted_run_leaves_nothing_that_looks_done(built, tmp_path, monkeypatch):
    paths, cfg, _ = built
    work = Paths(raw=tmp_path, workdir=tmp_path / "data")
    work.curated.mkdir(parents=True)
    for f in paths.curated.iterdir():
        (work.curated / f.name).write_bytes(f.read_bytes())
    work.tokens.mkdir(parents=True)
    (work.tokens / "tokenizer.json").write_bytes((paths.tokens / "tokenizer.json").read_bytes())

    calls = {"n": 0}
    real = shards.ArrowShardWriter.close

    def failing(*args, **kwargs):  # fail after the first modality's token shards are on disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards.ArrowShardWriter, "close", failing)
    with pytest.raises(OSError, match="disk full"):
        write_shards(cfg, work)
    assert calls["n"] == 2
    assert sorted(p.name for p in work.tokens.iterdir()) == ["tokenizer.json"]  # no shards/, no temp folder

    # a failure on rerun keeps the previous complete output, untouched
    monkeypatch.setattr(shards.ArrowShardWriter, "close", real)
    write_shards(cfg, work)
    before = (work.tokens / "shards" / "manifest.json").read_text()
    calls["n"] = 0
    monkeypatch.setattr(shards.ArrowShardWriter, "close", failing)
    with pytest.raises(OSError):
        write_shards(cfg, work)
    assert (work.tokens / "shards" / "manifest.json").read_text() == before
    load_manifest(work.tokens / "shards", verify=True)
    assert sorted(p.name for p in work.tokens.iterdir()) == ["shards", "tokenizer.json"]


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    paths = Paths(raw=tmp_path, workdir=tmp_path / "data")
    paths.curated.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="fm tokenize"):
        write_shards(ShardConfig(), paths)


def test_token_dtype():
    assert token_dtype(320) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert json.loads(json.dumps(shards.INDEX_DTYPE.descr)) is not None


def test_empty_modality_writes_no_shards(built, tmp_path):
    paths, cfg, _ = built
    work = Paths(raw=tmp_path, workdir=tmp_path / "data")
    work.curated.mkdir(parents=True)
    for f in paths.curated.iterdir():
        (work.curated / f.name).write_bytes(f.read_bytes())
    pq.write_table(SCHEMAS["triples"].empty_table(), work.curated / "triples.parquet")
    work.tokens.mkdir(parents=True)
    (work.tokens / "tokenizer.json").write_bytes((paths.tokens / "tokenizer.json").read_bytes())
    summary = write_shards(cfg, work)
    assert summary["counts"]["triples"] == {"docs": 0, "tokens": 0}
    manifest = load_manifest(work.tokens / "shards", verify=True)
    assert not [e for e in manifest["shards"] if e["modality"] == "triples"]


def test_withheld_triples_are_left_out_of_pretraining(built, tmp_path):
    """The facts fm.data.instructions withholds never reach a token shard; the manifest counts them."""
    from fm.data.instructions import WITHHELD_SCHEMA

    paths, cfg, _ = built
    withheld_rows = [{"fact_id": "f1", "task": "hypernym", "lang": s_lang, "subject": s, "relation": r}
                     for s, r, _, s_lang in TRIPLES[:2]]
    work = tmp_path / "data"
    shutil.copytree(paths.workdir, work, ignore=shutil.ignore_patterns("shards"))
    moved = Paths(raw=work / "01_raw", workdir=work)
    moved.instructions.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(withheld_rows, schema=WITHHELD_SCHEMA), moved.instructions / "withheld.parquet")
    summary = write_shards(cfg, moved)
    manifest = load_manifest(moved.tokens / "shards")
    dropped = [t for t in TRIPLES if (t[0], t[1], t[3]) in {(w["subject"], w["relation"], w["lang"]) for w in withheld_rows}]
    assert manifest["withheld"]["facts"] == 2 and manifest["withheld"]["triples"] == len(dropped) > 0
    assert summary["withheld"] == manifest["withheld"]
    assert manifest["withheld"]["sha256"] == hashlib.sha256((moved.instructions / "withheld.parquet").read_bytes()).hexdigest()
    docs = pa.concat_tables(read_arrow(moved.tokens / "shards" / e["path"]) for e in manifest["shards"]
                            if e["kind"] == "docs" and e["modality"] == "triples")
    assert docs.num_rows == len(TRIPLES) - len(dropped)
    assert not {t[0] + " | " + t[1] for t in dropped} & {x.rsplit(" | ", 1)[0] for x in docs["text"].to_pylist()}
    tok = load_tokenizer(moved)
    stream = "".join(tok.decode(read_token_shard(moved.tokens / "shards" / e["path"]).tolist(), skip_special_tokens=False)
                     for e in manifest["shards"] if e["kind"] == "tokens" and e["modality"] == "triples")
    for s, r, o, _ in dropped:
        assert f"{s} | {r} | {o}" not in stream
    assert load_manifest(paths.tokens / "shards")["withheld"] == {"facts": 0, "triples": 0, "sha256": None}
