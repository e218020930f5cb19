"""The tokenize stage: train one byte-level BPE tokenizer on the curated corpus.

    fm tokenize                      # data/04_curated/*.parquet -> data/05_tokens/tokenizer.json

Reads the `text` column of every curated table (documents, source files, captions,
linearized triples), a batch at a time, takes up to `tokenize.max_train_bytes` of it in a fixed
order (memory: that sample and a few numbers per document, never the corpus), and trains
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fm.config import TokenizeConfig
from fm.data.schema import MODALITIES, id_keys, read_batches
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

    Two passes, so that memory holds the sample and a few numbers per document, not the corpus: the first
    reads the ids and text lengths a batch at a time and picks the sample; the second reads the picked texts.
    """
    tables = curated_tables(paths)
    hi, lo, sizes, modality_of, row_of = [], [], [], [], []
    for m, (modality, path) in enumerate(tables):
        offset = 0
        for batch in read_batches(path, ["id", "text"]):
            valid = pc.is_valid(batch["text"]).to_numpy(zero_copy_only=False)  # (B,) rows with text
            try:
                keys = id_keys(pc.filter(batch["id"], valid))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            hi.append(keys[0])
            lo.append(keys[1])
            # n_bytes is written by ingest; recompute rather than trust it for the budget
            sizes.append(pc.binary_length(pc.cast(pc.filter(batch["text"], valid), pa.binary())).to_numpy(zero_copy_only=False))
            modality_of.append(np.full(int(valid.sum()), m, np.int8))
            row_of.append(offset + np.flatnonzero(valid))
            offset += batch.num_rows
    empty = np.zeros(0, np.int64)
    hi, lo = np.concatenate(hi or [empty]).astype(np.uint64), np.concatenate(lo or [empty]).astype(np.uint64)
    n_bytes = np.concatenate(sizes or [empty]).astype(np.int64)  # (N,)
    modality_of, row_of = np.concatenate(modality_of or [empty]), np.concatenate(row_of or [empty])
    if n_bytes.sum() == 0:  # a BPE trained on nothing is 270 byte tokens that fail only at pretrain
        rows = ", ".join(f"{m}: {pq.read_metadata(p).num_rows}" for m, p in tables)
        raise ValueError(f"tokenize: no text to train on: the curated tables in {paths.curated} hold no text "
                         f"(rows per modality: {rows}); see {paths.quarantine} for why records were removed")
    names = np.array([modality for modality, _ in tables])
    order = np.lexsort((names[modality_of], lo, hi))  # by id, then modality: the sample's order
    keep = order
    if n_bytes.sum() > max_bytes:
        picked, total = [], 0
        for i in order.tolist():  # per document, not per token
            n = int(n_bytes[i])
            if total + n <= max_bytes:
                picked.append(i)
                total += n
        if not any(n_bytes[picked]):
            raise ValueError(f"tokenize: no curated document with text fits tokenize.max_train_bytes={max_bytes} "
                             f"(the smallest has {int(n_bytes[n_bytes > 0].min())} bytes)")
        keep = np.array(picked, np.int64)
    out: dict[str, list[str]] = {}
    for m in sorted(set(modality_of[keep].tolist()), key=lambda m: int(np.argmax(modality_of[keep] == m))):
        modality, path = tables[m]
        mine = keep[modality_of[keep] == m]  # this modality's sample, in sample order
        wanted = row_of[mine]  # (K,) their file rows
        rank = np.argsort(wanted)
        texts: list[str | None] = [None] * len(wanted)
        sorted_rows, cursor, offset = wanted[rank], 0, 0
        for batch in read_batches(path, ["text"]):
            end = offset + batch.num_rows
            stop = int(np.searchsorted(sorted_rows, end))
            if stop > cursor:
                picked_texts = batch["text"].take(pa.array(sorted_rows[cursor:stop] - offset)).to_pylist()
                for k, text in zip(rank[cursor:stop].tolist(), picked_texts):
                    texts[k] = text
                cursor = stop
            offset = end
        out[modality] = texts
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
        try:
            tok.save(str(tmp))
        except Exception as e:  # tokenizers' I/O error is a bare Exception ("No space left on device (os error 28)")
            raise OSError(None, str(e), str(out)) from e

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
