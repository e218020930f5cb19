"""Shared fixtures: small raw corpora written in the raw corpus contract, good and bad."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from fm.paths import Paths
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # its shutdown message would hit a closed stdout
# A project-local Prefect home, so tests never touch ~/.prefect.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect"))
# Prefect's ephemeral API server gets 20 s to start; on a loaded 2-core CI machine that is not always enough.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

EN_DOCS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
    "A foundation model is trained on broad data at scale and adapted to a wide range of downstream tasks.",
]
ZH_DOCS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]


def png_bytes(size=(32, 24), color=(200, 30, 30, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming a huge image: must be refused before decoding."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")


def make_good_corpus(root: Path) -> Path:
    """A small clean corpus in all four modalities (records: text 6, code 2, image_text 2, triples 3)."""
    write_jsonl(root / "text" / "en.jsonl", [{"text": t, "source": "fixture-en"} for t in EN_DOCS])
    write_jsonl(root / "text" / "zh.jsonl", [{"text": t, "lang": "zh", "source": "fixture-zh"} for t in ZH_DOCS])
    (root / "text" / "essay.txt").write_text(" ".join(EN_DOCS), encoding="utf-8")
    (root / "code" / "lib").mkdir(parents=True)
    (root / "code" / "lib" / "util.py").write_text("def add(a, b):\n    return a + b\n", encoding="utf-8")
    write_jsonl(root / "code" / "snippets.jsonl", [{"content": "int main(void) { return 0; }\n", "path": "main.c"}])
    img_dir = root / "image_text" / "shapes"
    img_dir.mkdir(parents=True)
    (img_dir / "red.png").write_bytes(png_bytes())
    (img_dir / "blue.png").write_bytes(png_bytes((20, 40), (20, 20, 220, 128)))
    write_jsonl(img_dir / "manifest.jsonl", [
        {"image": "red.png", "caption": "a red rectangle", "lang": "en"},
        {"image": "blue.png", "caption": "一个蓝色的长方形", "lang": "zh"},
    ])
    (root / "triples").mkdir(parents=True)
    (root / "triples" / "facts.tsv").write_text("Paris\tcapital of\tFrance\ten\ndog\thypernym\tcanine\ten\n", encoding="utf-8")
    write_jsonl(root / "triples" / "zh.jsonl", [{"subject": "巴黎", "relation": "首都", "object": "法国", "lang": "zh"}])
    return root


def make_bad_corpus(root: Path, outside: Path) -> dict[str, int]:
    """A corpus full of bad records; returns how many bad records it holds per modality."""
    make_good_corpus(root)
    (root / "text" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # bad UTF-8
    (root / "text" / "empty.txt").write_text("   \n", encoding="utf-8")  # empty
    (root / "text" / "notes.docx").write_bytes(b"PK\x03\x04")  # unknown file type
    write_jsonl(root / "text" / "broken.jsonl", [
        '{"text": "unterminated',  # malformed json
        {"txt": "wrong key"},  # missing field
        {"text": 42},  # wrong type
        {"text": "x" * 5000},  # too long under max_text_bytes=4096
    ])
    (root / "code" / "bad.py").write_bytes(b"print('\xff\xfe')\n")  # bad UTF-8
    img_dir = root / "image_text" / "shapes"
    (img_dir / "truncated.png").write_bytes(png_bytes((64, 64))[:60])
    (img_dir / "bomb.png").write_bytes(bomb_png())
    (img_dir / "tiny.png").write_bytes(png_bytes((2, 2)))
    (img_dir / "fake.png").write_bytes(b"not an image at all")
    (outside / "secret.png").write_bytes(png_bytes())
    (outside / "secret.txt").write_text("a file outside the corpus", encoding="utf-8")
    (root / "text" / "link.txt").symlink_to(outside / "secret.txt")  # escapes through a symlink
    write_jsonl(img_dir / "bad_manifest.jsonl", [
        {"image": "truncated.png", "caption": "truncated"},
        {"image": "bomb.png", "caption": "bomb"},
        {"image": "tiny.png", "caption": "tiny"},
        {"image": "fake.png", "caption": "fake"},
        {"image": "../../../../outside/secret.png", "caption": "escape"},
        {"image": "/etc/passwd", "caption": "absolute"},
        {"image": "missing.png", "caption": "missing"},
        {"image": "red.png", "caption": ""},
    ])
    (root / "triples" / "bad.tsv").write_text("only\ttwo\nsubj\t\tobj\na\tb\tc\td\te\n", encoding="utf-8")
    write_jsonl(root / "triples" / "bad.jsonl", [{"subject": "x", "relation": "y"}])
    return {"text": 8, "code": 1, "image_text": 8, "triples": 4}


@pytest.fixture
def good_corpus(tmp_path: Path) -> Path:
    return make_good_corpus(tmp_path / "raw")


@pytest.fixture
def bad_corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "corpus" / "raw"
    expected = make_bad_corpus(root, outside)
    return root, expected


REPO = Path(__file__).resolve().parent.parent


def build_sample_shards(workdir: Path, docs_per_source: int = 150, vocab_size: int = 512) -> Paths:
    """Real token shards from a slice of the bundled sample (fortunes, Tang poems, stdlib code),
    through the real tokenize and shard stages: what the training tests read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fm.config import ShardConfig, TokenizeConfig
    from fm.data.schema import SCHEMAS, content_id
    from fm.data.shards import write_shards
    from fm.data.tokenizer import train_tokenizer

    raw = REPO / "data" / "01_raw"
    paths = Paths(raw, workdir)
    paths.curated.mkdir(parents=True, exist_ok=True)
    text_rows = []
    for name, lang in (("fortunes.jsonl", "en"), ("tang-poems.jsonl", "zh")):
        lines = (raw / "text" / name).read_text(encoding="utf-8").splitlines()[:docs_per_source]
        for i, line in enumerate(lines):
            t = json.loads(line)["text"]
            text_rows.append({"id": content_id("text", t), "modality": "text", "source": name.split(".")[0], "source_file": f"text/{name}",
                              "position": i + 1, "lang": lang, "text": t, "n_bytes": len(t.encode()), "meta": None})
    code_rows = []
    # Split on "\n" as ingest does: str.splitlines() would also split on U+2028 inside a record.
    lines = (raw / "code" / "cpython-lib.jsonl").read_text(encoding="utf-8").split("\n")[:12]
    for i, line in enumerate(lines):
        rec = json.loads(line)
        t = rec["content"]
        code_rows.append({"id": content_id("code", t), "modality": "code", "source": rec["source"], "source_file": "code/cpython-lib.jsonl",
                          "position": i + 1, "lang": rec["language"], "text": t, "n_bytes": len(t.encode()), "meta": None})
    pq.write_table(pa.Table.from_pylist(text_rows, schema=SCHEMAS["text"]), paths.curated / "text.parquet")
    pq.write_table(pa.Table.from_pylist(code_rows, schema=SCHEMAS["code"]), paths.curated / "code.parquet")
    train_tokenizer(TokenizeConfig(vocab_size=vocab_size, min_frequency=2), paths)
    write_shards(ShardConfig(tokens_per_shard=40_000), paths)
    return paths


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Paths:
    return build_sample_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP barriers stall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The whole-pipeline tests are the longest file by far: collected first, one xdist worker (--dist loadfile)
    starts on them while the other takes the rest, instead of running them alone at the end."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_pipeline.py")
