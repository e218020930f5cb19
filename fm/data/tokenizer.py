"""The tokenize stage: train one byte-level BPE tokenizer on the curated corpus.

    fm tokenize                      # data/04_curated/*.parquet -> data/05_tokens/tokenizer.json

Reads the `text` column of every curated table (documents, source files, captions,
linearized triples), takes up to `tokenize.max_train_bytes` of it in a fixed order, and trains
an HF `tokenizers` BPE: NFC normalizer, ByteLevel pre-tokenizer and decoder, and the 256
byte symbols as the initial alphabet, so every byte string encodes (no unknown token) and
`decode(encode(x)) == NFC(x)` for English, Chinese and code alike.

The special tokens (`SPECIAL_TOKENS`) take the first ids, in the order listed there;
`<|endoftext|>` is id 0. The output loads with `tokenizers.Tokenizer.from_file`.
"""

from __future__ import annotations

import time
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fm.config import TokenizeConfig
from fm.data.schema import MODALITIES
from fm.io import atomic_path
from fm.paths import Paths

# Every special token, in id order (id = position in this tuple). Later stages refer to them
# by name, never by number:
#   <|endoftext|>          ends every pretraining document; id 0
#   <|pad|>                padding in batches (masked out of the loss)
#   <|text|> .. <|triples|> the modality a document came from, first token of every document
#   <|lang:en|> ...        the document's language, second token; a language without its own
#                          token (and code, whose `lang` is a programming language) gets
#                          <|lang:other|>; the exact language stays in the shard index
#   <|system|> <|user|> <|assistant|> <|end|>   instruction (SFT) turns: `<|user|>...<|end|>`
#   <|image|>              where an image's embedding goes in a multi-modal prompt
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|pad|>",
    "<|text|>",
    "<|code|>",
    "<|image_text|>",
    "<|triples|>",
    "<|lang:en|>",
    "<|lang:zh|>",
    "<|lang:other|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|image|>",
)
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
LANG_TOKENS = {"en": "<|lang:en|>", "zh": "<|lang:zh|>"}


def modality_token(modality: str) -> str:
    return f"<|{modality}|>"


def lang_token(lang: str | None) -> str:
    """'en' / 'EN' / 'en-US' -> <|lang:en|>; 'zh-Hans' -> <|lang:zh|>; anything else -> <|lang:other|>."""
    base = (lang or "").lower().replace("_", "-").split("-")[0]
    return LANG_TOKENS.get(base, "<|lang:other|>")


def curated_tables(paths: Paths) -> list[tuple[str, Path]]:
    """(modality, parquet path) for each curated table present, in MODALITIES order."""
    found = [(m, paths.curated / f"{m}.parquet") for m in MODALITIES]
    found = [(m, p) for m, p in found if p.exists()]
    if not found:
        raise FileNotFoundError(f"no curated tables in {paths.curated}: run `fm curate` first")
    return found


def select_training_text(paths: Paths, max_bytes: int) -> dict[str, list[str]]:
    """Up to `max_bytes` of UTF-8 text per the curated tables, keyed by modality.

    Documents are taken in order of their content id (a hash), across all modalities at once:
    a fixed pseudo-random sample that does not depend on file order and keeps each modality's
    share of the corpus. A document that would overflow the budget is skipped, not cut.
    """
    parts = []
    for modality, path in curated_tables(paths):
        table = pq.read_table(path, columns=["id", "text", "n_bytes"])
        table = table.filter(pc.is_valid(table["text"]))
        n = table.num_rows
        parts.append(pa.table({
            "id": table["id"],
            "text": table["text"],
            # n_bytes is written by ingest; recompute rather than trust it for the budget
            "n_bytes": pc.binary_length(pc.cast(table["text"], pa.binary())),
            "modality": pa.array([modality] * n, pa.string()),
        }))
    table = pa.concat_tables(parts).sort_by([("id", "ascending"), ("modality", "ascending")])
    n_bytes = table["n_bytes"].to_numpy()  # (N,) int64
    if n_bytes.sum() == 0:  # a BPE trained on nothing is 270 byte tokens that fail only at pretrain
        rows = ", ".join(f"{m}: {pq.read_metadata(p).num_rows}" for m, p in curated_tables(paths))
        raise ValueError(f"tokenize: no text to train on: the curated tables in {paths.curated} hold no text "
                         f"(rows per modality: {rows}); see {paths.quarantine} for why records were removed")
    if n_bytes.sum() > max_bytes:
        keep, total = [], 0
        for i, n in enumerate(n_bytes.tolist()):  # per document, not per token
            if total + n <= max_bytes:
                keep.append(i)
                total += n
        if not any(n_bytes[keep]):
            raise ValueError(f"tokenize: no curated document with text fits tokenize.max_train_bytes={max_bytes} "
                             f"(the smallest has {int(n_bytes[n_bytes > 0].min())} bytes)")
        table = table.take(pa.array(keep, pa.int64()))
    out: dict[str, list[str]] = {}
    for text, modality in zip(table["text"].to_pylist(), table["modality"].to_pylist()):
        out.setdefault(modality, []).append(text)
    return out


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with fm's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # add_prefix_space=False: a leading space would not be removed by decode, breaking round trips
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(cfg: TokenizeConfig, paths: Paths) -> dict:
    """Train the BPE on the curated corpus, write `paths.tokens/tokenizer.json`, return a summary."""
    start = time.perf_counter()
    texts = select_training_text(paths, cfg.max_train_bytes)
    min_vocab = len(SPECIAL_TOKENS) + 256
    if cfg.vocab_size < min_vocab:
        raise ValueError(f"tokenize.vocab_size must be at least {min_vocab} (specials + 256 bytes), got {cfg.vocab_size}")

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for modality in texts for t in texts[modality]]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    for token, i in SPECIAL_IDS.items():  # the trainer assigns specials first; make sure of it
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))

    out = paths.tokens / "tokenizer.json"
    with atomic_path(out) as tmp:
        tok.save(str(tmp))

    # Compression on the training text itself: UTF-8 bytes per token, per modality.
    bytes_per_token = {}
    for modality, docs in texts.items():
        n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
        n_bytes = sum(len(unicodedata.normalize("NFC", d).encode()) for d in docs)
        bytes_per_token[modality] = round(n_bytes / max(n_tokens, 1), 3)
    train_bytes = sum(len(t.encode()) for t in corpus)
    return {
        "stage": "tokenize",
        "vocab_size": tok.get_vocab_size(),
        "train_bytes": train_bytes,
        "train_docs": {m: len(d) for m, d in texts.items()},
        "bytes_per_token": bytes_per_token,
        "outputs": [str(out)],
        "seconds": round(time.perf_counter() - start, 3),
    }


def open_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json for fm's use: the text it encodes never produces special tokens.

    A literal "<|endoftext|>" in a document or a user's prompt must stay text; control tokens
    (end of text, the chat template's turns) are inserted by id. tokenizers' JSON format cannot
    carry this setting (tokenizers 0.23: `encode_special_tokens` is not saved), so every fm
    loader sets it here; a plain `Tokenizer.from_file` matches special tokens in text.
    """
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(paths: Paths) -> Tokenizer:
    """The trained tokenizer (special tokens never matched in text); a one-line error if the tokenize stage has not run."""
    path = paths.tokens / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run `fm tokenize` first")
    return open_tokenizer(path)
