"""Curate: exact dedup, quality filters and MinHash near-duplicate removal, plus corpus statistics.

    fm curate        # data/03_validated/*.parquet -> data/04_curated/*.parquet, quarantine, stats

Per modality, in this order (a record is quarantined for the first rule it breaks):

1. exact duplicates: the same `id` (a content hash) seen earlier in the file -> `exact_duplicate`.
2. quality (text and code only; captions and triples are short by nature and exempt):
   fewer than `min_chars` characters once stripped -> `too_short`; a share of characters that
   are neither alphanumeric nor whitespace above `max_non_alnum_ratio` -> `symbol_ratio`.
3. near duplicates (text and code only, within one modality): a document is removed when its
   shingle set has Jaccard similarity >= `jaccard_threshold` with an *earlier kept* document.
   Shingles are word n-grams of lowercased whitespace tokens, or character n-grams for text
   written without spaces (Chinese, Japanese, Thai). MinHash (rensa) + LSH banding proposes
   candidate pairs; each candidate is confirmed with the exact Jaccard of the two shingle sets
   (the MinHash estimate only screens, with a wide margin): only documents that collided in
   some band need their shingles, so it is cheap, and it removes the estimator's noise (about
   +-0.035 at 128 permutations near 0.8), which leaves LSH misses as the only difference from
   `exact_near_duplicates`, the exact reference that tests and bench/curate_bench.py use.

Memory does not grow with the corpus beyond the dedup index (issue 13): each table is read a batch at a time,
several times: ids (kept as 16-byte keys) and quality reasons; the band keys of the surviving texts
(num_bands x 8 bytes a document); the texts of the LSH candidates only; then the kept rows are written a row
group per batch. The outputs do not depend on the batch size.

Everything removed lands in the quarantine with the reason (and the kept id for a duplicate).
Statistics per (modality, lang, source) go to 04_curated/stats.parquet, which the run registry
(fm/registry.py) loads as the DuckDB table `corpus_stats`.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import re
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rensa import RMinHash
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fm.config import CurateConfig
from fm.data.quarantine import check_counts, read_quarantine, write_quarantine
from fm.data.schema import MODALITIES, id_keys, read_batches
from fm.io import atomic_path, write_parquet
from fm.paths import Paths

FILTERED_MODALITIES = ("text", "code")  # quality filters and near-dup; captions and triples are exempt
REASONS = ("exact_duplicate", "too_short", "symbol_ratio", "near_duplicate")

_CHUNK_CHARS = 2_000_000  # characters per MinHash job: big enough for numpy to pay, small for memory
# Above this many characters MinHash runs on all cores with a progress bar; below, starting
# worker processes (about half a second) costs more than the second core saves.
_LARGE_INPUT_CHARS = 20_000_000

# ---------------------------------------------------------------------------------------------
# Shingles: hashed n-grams, computed for many documents at once with numpy


# Characters written without spaces between words: such a document is shingled by characters.
_UNSPACED_RUNS = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
# Every code point for which str.isspace() is true lies below U+3001, so a table covers them all.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)])
_U64 = np.uint64
_TOKEN_BASE = _U64(0x100000001B3)  # odd, so it has an inverse modulo 2**64
_TOKEN_BASE_INVERSE = _U64(pow(0x100000001B3, -1, 2**64))


def _position_multipliers(count: int) -> np.ndarray:
    """Fixed odd 64-bit multipliers, one per position in an n-gram or LSH band, so order counts."""
    return np.random.default_rng(20240607).integers(1, 2**63, size=count, dtype=np.uint64) | _U64(1)


def is_unspaced(text: str) -> bool:
    """True when most non-space characters belong to a script written without spaces (CJK, Thai)."""
    if text.isascii():
        return False
    unspaced = sum(map(len, _UNSPACED_RUNS.findall(text)))
    return unspaced > 0 and 2 * unspaced > len("".join(text.split()))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the 64 output bits (wrapping arithmetic)."""
    x = x ^ (x >> _U64(30))
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _token_hashes(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Hash of each token chars[s:e]: sum_j (c_j + 1) * B**(j - s) mod 2**64, then mixed.

    One prefix sum serves every token, so the cost is a few passes over the characters with no
    Python per token; the polynomial is position-free, so a word hashes alike wherever it occurs.
    """
    powers = np.full(chars.size, _TOKEN_BASE, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)  # B**j, wrapping
    weighted = chars.astype(np.uint64)
    weighted += _U64(1)
    weighted *= powers
    prefix = np.zeros(chars.size + 1, dtype=np.uint64)
    np.cumsum(weighted, out=prefix[1:])
    powers.fill(_TOKEN_BASE_INVERSE)
    powers[0] = 1
    np.cumprod(powers, out=powers)  # B**-j: shifts each token's sum back to start at B**0
    return _mix64((prefix[ends] - prefix[starts]) * powers[starts])


def shingle_hashes(texts: Sequence[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each document's shingles: document d owns hashes[offsets[d]:offsets[d+1]].

    A token is a lowercased whitespace-separated word (str.split), or a single non-space character
    in text written without spaces (`is_unspaced`); a shingle is `shingle_size` consecutive tokens.
    A shorter document is one shingle, one without tokens has none. Hashes may repeat in a document.
    """
    n = len(texts)
    lowered = [t.lower() for t in texts]
    lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=n)
    # All documents as one array of code points, "\n"-separated so that no token spans two.
    chars = np.frombuffer("\n".join(lowered).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (L,)
    is_space = (chars <= 0x3000) & _IS_SPACE[np.minimum(chars, 0x3000)]
    boundary_before, boundary_after = np.r_[True, is_space[:-1]], np.r_[is_space[1:], True]
    unspaced = np.fromiter(map(is_unspaced, lowered), dtype=bool, count=n)
    if unspaced.any():  # each character of an unspaced document is a token of its own
        char_unspaced = np.repeat(unspaced, lengths + 1)[: chars.size]
        boundary_before |= char_unspaced
        boundary_after |= char_unspaced
    token_starts = np.flatnonzero(~is_space & boundary_before)
    token_ends = np.flatnonzero(~is_space & boundary_after) + 1
    if token_starts.size == 0:
        return np.zeros(0, np.uint64), np.zeros(n + 1, np.int64)
    tokens = _token_hashes(chars, token_starts, token_ends)  # (T,)
    doc_starts = np.r_[0, np.cumsum(lengths + 1)[:-1]]
    doc_of_token = np.searchsorted(doc_starts, token_starts, side="right") - 1

    # Shingle hash: position-weighted sum of its k token hashes (only tokens of the same document).
    k = shingle_size
    multipliers = _position_multipliers(k)
    shingles = tokens * multipliers[0]
    for t in range(1, min(k, tokens.size)):
        same_doc = doc_of_token[t:] == doc_of_token[:-t]
        shingles[:-t] += np.where(same_doc, tokens[t:] * multipliers[t], _U64(0))
    complete = np.zeros(tokens.size, dtype=bool)  # the shingle starting here has all k tokens
    if tokens.size >= k:
        complete[: tokens.size - k + 1] = doc_of_token[k - 1 :] == doc_of_token[: tokens.size - k + 1]
    tokens_per_doc = np.bincount(doc_of_token, minlength=n)
    first_of_doc = np.r_[True, doc_of_token[1:] != doc_of_token[:-1]]
    valid = complete | (first_of_doc & (tokens_per_doc[doc_of_token] < k))
    offsets = np.r_[0, np.cumsum(np.bincount(doc_of_token[valid], minlength=n))]
    return _mix64(shingles[valid]), offsets


def shingle_sets(texts: Sequence[str], shingle_size: int) -> list[np.ndarray]:
    """Each document's shingle set as a sorted array of unique hashes."""
    hashes, offsets = shingle_hashes(texts, shingle_size)
    return [np.unique(hashes[offsets[d] : offsets[d + 1]]) for d in range(len(texts))]


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique hash arrays."""
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (a.size + b.size - shared)


# ---------------------------------------------------------------------------------------------
# Near-duplicates


def _signatures(job: tuple[list[str], int, int, int]) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32 of one chunk of documents; runs in a worker."""
    texts, shingle_size, num_perm, seed = job
    hashes, offsets = shingle_hashes(texts, shingle_size)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets.astype(np.uint64), num_perm, seed)
    return np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), num_perm)


def _band_keys(signatures: np.ndarray, num_bands: int) -> np.ndarray:
    """One 64-bit key per LSH band: (n, num_perm) uint32 -> (n, num_bands) uint64."""
    n, num_perm = signatures.shape
    bands = signatures.reshape(n, num_bands, num_perm // num_bands).astype(np.uint64)  # (n, B, r)
    weights = _position_multipliers(bands.shape[2])
    return _mix64((bands * weights).sum(axis=2, dtype=np.uint64))  # wrapping sum, (n, B)


def _text_chunks(texts, cfg: CurateConfig, max_chars: int = _CHUNK_CHARS):
    """MinHash jobs of about max_chars characters each from an iterable of texts."""
    chunk, chars = [], 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield (chunk, cfg.shingle_size, cfg.num_perm, cfg.seed)
            chunk, chars = [], 0
    if chunk:
        yield (chunk, cfg.shingle_size, cfg.num_perm, cfg.seed)


def lsh_keys(texts, cfg: CurateConfig, total_chars: int, processes: int | None = None, *, count: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(band keys (count, num_bands) uint64, has_shingles (count,) bool) of an iterable of `count` texts, read once.

    Signatures are computed over chunks of documents, in `processes` worker processes (default: all usable
    cores when total_chars is large, else this process alone), a few chunks at a time so that only those are
    in memory; only the band keys (num_bands x 8 bytes a document) are kept. They depend only on the texts
    and cfg, never on the number of processes."""
    large = total_chars >= _LARGE_INPUT_CHARS
    processes = processes or (len(os.sched_getaffinity(0)) if large else 1)
    keys = np.zeros((count, cfg.num_bands), np.uint64)  # filled in place: no second copy to concatenate
    has_shingles = np.zeros(count, bool)
    done = 0

    def take(chunk, signatures):
        nonlocal done
        keys[done:done + len(signatures)] = _band_keys(signatures, cfg.num_bands)
        has_shingles[done:done + len(signatures)] = [bool(t.strip()) for t in chunk[0]]
        done += len(signatures)

    columns = (TextColumn("minhash"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not large) as bar:
        task = bar.add_task("minhash", total=max(1, math.ceil(total_chars / _CHUNK_CHARS)))
        chunks = _text_chunks(texts, cfg)
        if processes > 1:
            # forkserver, not fork: the caller may hold threads (Prefect, DuckDB) that a fork would
            # copy mid-lock; with this module preloaded, a pool starts in well under a second.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with context.Pool(processes) as pool:
                while window := list(itertools.islice(chunks, 2 * processes)):  # imap would read every chunk ahead
                    for chunk, signatures in zip(window, pool.map(_signatures, window)):
                        take(chunk, signatures)
                        bar.advance(task)
        else:
            for chunk in chunks:
                take(chunk, _signatures(chunk))
                bar.advance(task)
    if done != count:
        raise ValueError(f"lsh_keys: {done} texts, {count} announced")
    return keys, has_shingles


SCREEN_MARGIN = 0.2  # the MinHash estimate screens pairs at jaccard_threshold - 0.2 (over 4 standard deviations)
_LOOP_SLICE = 4096  # candidates whose band keys are Python ints at once in the keep-or-remove loop
_BIG_BUCKET = 256  # a bucket of more documents than this needs every member's shingles (its pairs are not screened)


def _screened(keys: np.ndarray, shared: np.ndarray, signatures: np.ndarray, screen: float) -> np.ndarray:
    """(C,) bool: the candidates whose MinHash estimate with another candidate of a shared bucket reaches `screen`,
    i.e. every document the exact check can ever be asked about (it compares only such pairs). Every pair of a
    bucket is screened, offset by offset in the bucket's order, vectorized (memory C x num_perm bytes a step)."""
    c, num_bands = keys.shape
    needs = np.zeros(c, bool)
    for b in range(num_bands):
        members = np.flatnonzero(shared[:, b])
        if members.size == 0:
            continue
        order = members[np.argsort(keys[members, b], kind="stable")]  # (M,) a bucket's members side by side
        bucket = keys[order, b]
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        big = np.repeat(sizes > _BIG_BUCKET, sizes)  # (M,)
        needs[order[big]] = True
        for d in range(1, min(int(sizes.max()), _BIG_BUCKET + 1)):
            pairs = np.flatnonzero((bucket[:-d] == bucket[d:]) & ~big[:-d])  # t and t + d share a bucket
            if pairs.size == 0:
                break
            a, z = order[pairs], order[pairs + d]
            close = (signatures[a] == signatures[z]).mean(axis=1) >= screen
            needs[a[close]] = needs[z[close]] = True
    return needs


def near_duplicates_from_keys(keys: np.ndarray, has_shingles: np.ndarray, fetch, cfg: CurateConfig
                              ) -> dict[int, tuple[int, float]]:
    """The LSH + exact-confirmation rule of find_near_duplicates on precomputed band keys: only documents that
    share a band with another one are candidates, and only their texts are read (fetch(indices) -> an iterable of
    their texts, in order), a chunk at a time: once for their signatures (the estimate that screens), and once
    more for the shingle sets (the exact Jaccard) of the candidates some pair of which passes the screen; the
    texts themselves are not kept. Memory: num_perm x 4 bytes a candidate, plus the screened ones' shingles."""
    n = len(keys)
    shared = np.zeros((n, cfg.num_bands), dtype=bool)  # (n, B) a bucket another document is in too
    for b in range(cfg.num_bands):
        band = np.where(has_shingles, keys[:, b], np.arange(n, dtype=np.uint64))  # no shingles: a key of its own
        _, inverse, counts = np.unique(band, return_inverse=True, return_counts=True)
        shared[:, b] = (counts[inverse.reshape(-1)] > 1) & has_shingles
    candidates = np.flatnonzero(shared.any(axis=1))
    if candidates.size == 0:
        return {}
    # In chunks of a quarter of the MinHash jobs' size: numpy's temporaries scale with a chunk (in this process).
    # The low 16 bits of each MinHash value are kept: equal values stay equal, so an estimate can only rise by
    # the rare extra match (1 in 65536 a position) and the screen lets through a superset of the pairs it let
    # through on full values; the exact Jaccard decides, so what is found is the same, at half the memory.
    signatures = np.zeros((len(candidates), cfg.num_perm), np.uint16)  # (C, P) filled in place
    done = 0
    for chunk in _text_chunks(fetch(candidates), cfg, _CHUNK_CHARS // 4):
        signatures[done:done + len(chunk[0])] = _signatures(chunk).astype(np.uint16)
        done += len(chunk[0])
    screen = cfg.jaccard_threshold - SCREEN_MARGIN
    screened = np.flatnonzero(_screened(keys[candidates], shared[candidates], signatures, screen))
    shingle_set: list[np.ndarray | None] = [None] * len(candidates)
    if screened.size:
        sets = (s for chunk in _text_chunks(fetch(candidates[screened]), cfg, _CHUNK_CHARS // 4)
                for s in shingle_sets(chunk[0], cfg.shingle_size))
        for k, shingles in zip(screened.tolist(), sets, strict=True):
            shingle_set[k] = shingles

    # In document order: compare with the kept documents that share a band; keep or remove. Candidates are
    # named by their position k in `candidates`; their keys become Python ints a slice at a time.
    kept_in_bucket: list[dict[int, list[int]]] = [{} for _ in range(cfg.num_bands)]  # per band: key -> kept k
    removed: dict[int, tuple[int, float]] = {}
    for start in range(0, len(candidates), _LOOP_SLICE):
        rows = candidates[start:start + _LOOP_SLICE]
        for k, row, in_shared in zip(itertools.count(start), keys[rows].tolist(), shared[rows].tolist()):
            # only buckets another document shares: a bucket of one can never match (and is not worth keeping)
            buckets = [(b, key) for b, (key, s) in enumerate(zip(row, in_shared)) if s]
            earlier = list(dict.fromkeys(j for b, key in buckets for j in kept_in_bucket[b].get(key, ())))
            # Screen with the MinHash estimate first, so a large family of similar-but-kept documents stays cheap.
            estimates = (signatures[earlier] == signatures[k]).mean(axis=1) if earlier else np.zeros(0)
            best = None
            for j in np.asarray(earlier, np.int64)[estimates >= screen].tolist():  # both screened: shingles at hand
                similarity = _jaccard(shingle_set[k], shingle_set[j])
                if similarity >= cfg.jaccard_threshold and (best is None or similarity > best[1]):
                    best = (int(candidates[j]), similarity)
            if best is not None:
                removed[int(candidates[k])] = best
                shingle_set[k] = None  # a removed document is never compared with again
            else:
                for b, key in buckets:
                    kept_in_bucket[b].setdefault(key, []).append(k)
    return removed


def find_near_duplicates(
    texts: Sequence[str], cfg: CurateConfig, processes: int | None = None
) -> dict[int, tuple[int, float]]:
    """{removed index: (kept index, Jaccard)}: documents with Jaccard >= cfg.jaccard_threshold to
    an earlier kept document, found with MinHash LSH and confirmed exactly (module docstring).

    Signatures are computed over chunks of documents, in `processes` worker processes (default:
    all usable cores for a large input, else this process alone). The result depends only on
    texts and cfg, never on the number of processes.
    """
    keys, has_shingles = lsh_keys(texts, cfg, sum(map(len, texts)), processes, count=len(texts))
    return near_duplicates_from_keys(keys, has_shingles, lambda rows: (texts[i] for i in rows.tolist()), cfg)


def exact_near_duplicates(texts: Sequence[str], cfg: CurateConfig) -> dict[int, tuple[int, float]]:
    """The truth `find_near_duplicates` approximates, on the same shingles and the same rule,
    computed exactly: every pair that can reach the threshold is compared.

    Prefix filtering (Chaudhuri et al. 2006) makes that affordable: with shingles ordered rarest
    first, two sets with Jaccard >= t share a shingle among the first |s| - ceil(t |s|) + 1 of
    each, so only documents sharing a prefix shingle are compared. For tests and the benchmark.
    """
    t = cfg.jaccard_threshold
    sets = shingle_sets(texts, cfg.shingle_size)
    if not any(s.size for s in sets):
        return {}
    unique, inverse, counts = np.unique(np.concatenate(sets), return_inverse=True, return_counts=True)
    rank_of_unique = np.empty(unique.size, dtype=np.int64)
    rank_of_unique[np.lexsort((unique, counts))] = np.arange(unique.size)  # rarest first
    # Each document's shingles as ranks (a rank names one shingle), rarest first.
    ranked = [np.sort(r) for r in np.split(rank_of_unique[inverse], np.cumsum([s.size for s in sets])[:-1])]

    kept_with_prefix: dict[int, list[int]] = {}
    removed: dict[int, tuple[int, float]] = {}
    for i, shingles in enumerate(ranked):
        if shingles.size == 0:
            continue
        prefix = shingles[: shingles.size - math.ceil(t * shingles.size - 1e-9) + 1].tolist()
        best = None
        for j in dict.fromkeys(j for s in prefix for j in kept_with_prefix.get(s, ())):
            similarity = _jaccard(shingles, ranked[j])
            if similarity >= t and (best is None or similarity > best[1]):
                best = (j, similarity)
        if best is not None:
            removed[i] = best
        else:
            for s in prefix:
                kept_with_prefix.setdefault(s, []).append(i)
    return removed


# ---------------------------------------------------------------------------------------------
# Quality filters

# Runs of letters, digits, "_" and whitespace; what is left after removing them is symbols.
_WORD_OR_SPACE_RUNS = re.compile(r"[\w\s]+")


def quality_reason(text: str, cfg: CurateConfig) -> str | None:
    """Why `text` fails the quality filters ("too_short", "symbol_ratio 0.62 > 0.50"), or None."""
    if len(text.strip()) < cfg.min_chars:  # surrounding whitespace is not content
        return "too_short"
    # "_" is matched by \w but is not alphanumeric, so it counts as a symbol.
    symbols = len(_WORD_OR_SPACE_RUNS.sub("", text)) + text.count("_")
    ratio = symbols / len(text)
    if ratio > cfg.max_non_alnum_ratio:
        return f"symbol_ratio {ratio:.2f} > {cfg.max_non_alnum_ratio:.2f}"
    return None


# ---------------------------------------------------------------------------------------------
# The stage


def _batches(path, columns: list[str] | None = None):
    """(first row, batch) of the table at path, a batch at a time (no read-ahead)."""
    offset = 0
    for batch in read_batches(path, columns):
        yield offset, batch
        offset += batch.num_rows


def _fetch_texts(path, rows: np.ndarray):
    """The texts of the given rows (sorted, unique) of the table at path, in that order, read a batch at a time."""
    cursor = 0
    for offset, batch in _batches(path, ["text"]):
        stop = int(np.searchsorted(rows, offset + batch.num_rows))
        if stop > cursor:
            yield from (t or "" for t in batch["text"].take(pa.array(rows[cursor:stop] - offset)).to_pylist())
            cursor = stop


def first_of_each_id(hi: np.ndarray, lo: np.ndarray) -> list[tuple[int, int]]:
    """[(row, the first row with its id)] for every row whose id (the keys of `id_keys`) an earlier row has."""
    if hi.size == 0:
        return []
    order = np.lexsort((lo, hi))  # stable: the rows of one id stay in row order, the first one first
    h, l = hi[order], lo[order]
    starts = np.r_[True, (h[1:] != h[:-1]) | (l[1:] != l[:-1])]  # (N,) the first of its id in the sorted order
    del h, l
    first = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]]  # (N,) in sorted order
    later = ~starts
    return sorted(zip(order[later].tolist(), first[later].tolist()))


def curate_removals(path, modality: str, cfg: CurateConfig) -> dict[int, tuple[str, int | None]]:
    """{row: (reason, row it duplicates or None)} for every row of one modality's table to quarantine, read a
    batch at a time: ids (16 bytes a row) for exact duplicates and quality reasons in a first pass, then for
    near duplicates the band keys of the surviving texts and the texts of the candidates (near_duplicates)."""
    hi, lo, removals, total_chars = [], [], {}, 0
    filtered = modality in FILTERED_MODALITIES
    for offset, batch in _batches(path, ["id", "text"] if filtered else ["id"]):
        try:
            h, l = id_keys(batch["id"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        hi.append(h)
        lo.append(l)
        if filtered:
            for row, text in enumerate(batch["text"].to_pylist(), offset):
                total_chars += len(text or "")
                if reason := quality_reason(text or "", cfg):
                    removals[row] = (reason, None)
    hi, lo = (np.concatenate(x) if x else np.zeros(0, np.uint64) for x in (hi, lo))
    for row, first in first_of_each_id(hi, lo):  # exact duplicates, whatever their quality
        removals[row] = ("exact_duplicate", first)
    if filtered and cfg.near_dup:
        survivors = np.array([row for row in range(len(hi)) if row not in removals], np.int64)
        del hi, lo
        texts = (t or "" for offset, batch in _batches(path, ["text"])
                 for row, t in enumerate(batch["text"].to_pylist(), offset) if row not in removals)
        keys, has_shingles = lsh_keys(texts, cfg, total_chars, count=len(survivors))
        found = near_duplicates_from_keys(keys, has_shingles, lambda idx: _fetch_texts(path, survivors[idx]), cfg)
        for index, (kept_index, similarity) in found.items():
            removals[int(survivors[index])] = (f"near_duplicate jaccard {similarity:.2f}", int(survivors[kept_index]))
    return dict(sorted(removals.items()))


def _reason_kind(reason: str) -> str:
    return reason.split(" ", 1)[0]  # "symbol_ratio 0.62 > 0.50" -> "symbol_ratio"


STATS_SCHEMA = pa.schema(
    [
        pa.field("modality", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("source", pa.string()),
        pa.field("docs_in", pa.int64()),  # records that reached curate
        pa.field("docs", pa.int64()),  # records kept
        pa.field("words", pa.int64()),  # kept; whitespace tokens, characters for unspaced text
        pa.field("bytes", pa.int64()),  # kept; UTF-8 bytes of `text`
        pa.field("docs_removed", pa.int64()),  # quarantined by curate, any reason
        pa.field("duplicates_removed", pa.int64()),  # exact + near duplicates
        pa.field("dedup_rate", pa.float64()),  # duplicates_removed / docs_in
    ]
)


def add_stats(groups: dict, batch: pa.RecordBatch, offset: int, removals: dict) -> None:
    """Count one batch of a modality's curate input into groups {(lang, source): counters}."""
    langs, sources = batch["lang"].to_pylist(), batch["source"].to_pylist()
    texts, n_bytes = batch["text"].to_pylist(), batch["n_bytes"].to_pylist()
    for k in range(batch.num_rows):
        g = groups.setdefault((langs[k], sources[k]), dict.fromkeys(STATS_SCHEMA.names[3:-1], 0))
        g["docs_in"] += 1
        if offset + k in removals:
            g["docs_removed"] += 1
            g["duplicates_removed"] += _reason_kind(removals[offset + k][0]) in ("exact_duplicate", "near_duplicate")
            continue
        text = texts[k] or ""
        g["docs"] += 1
        # Tokens proper come after the tokenizer stage; here a word is a whitespace token, or a
        # character in text written without spaces (Chinese), which does not mark its words.
        g["words"] += len("".join(text.split())) if is_unspaced(text) else len(text.split())
        g["bytes"] += n_bytes[k] if n_bytes[k] is not None else len(text.encode())


def stats_rows(groups: dict, modality: str) -> list[dict]:
    """Statistics rows per (lang, source) of one modality's curate input."""
    rows = []
    for (lang, source), g in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")):
        dedup_rate = g["duplicates_removed"] / g["docs_in"]
        rows.append({"modality": modality, "lang": lang, "source": source, **g, "dedup_rate": dedup_rate})
    return rows


def curate_modality(path, out, modality: str, cfg: CurateConfig) -> tuple[dict, list[dict], list[dict]]:
    """Curate one modality's table into `out` (written atomically, a row group per batch) -> (counts, statistics
    rows, quarantine rows)."""
    removals = curate_removals(path, modality, cfg)
    referenced = {ref for _, ref in removals.values() if ref is not None}
    id_of: dict[int, str] = {}  # the ids quarantine rows name as duplicate_of (always an earlier row)
    groups: dict = {}
    quarantine = []
    n_in = n_kept = 0
    schema = pq.read_schema(path)
    kinds = [_reason_kind(reason) for reason, _ in removals.values()]
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for offset, batch in _batches(path):
                n_in, n_kept = n_in + batch.num_rows, n_kept + _curate_batch(
                    batch, offset, modality, removals, referenced, id_of, quarantine, writer)
                add_stats(groups, batch, offset, removals)
        counts = {"in": n_in, "kept": n_kept, "quarantined": len(removals),
                  **{kind: kinds.count(kind) for kind in REASONS}}  # fmt: skip
        check_counts("curate", {modality: counts})  # before the output is published
    return counts, stats_rows(groups, modality), quarantine


def _curate_batch(batch, offset: int, modality: str, removals: dict, referenced: set, id_of: dict, quarantine: list,
                  writer) -> int:
    """Write one batch's kept rows, add its quarantine rows; returns how many rows were kept."""
    ids = batch["id"].to_pylist()
    for k, id_ in enumerate(ids):
        if offset + k in referenced:
            id_of[offset + k] = id_
    mine = [row for row in range(offset, offset + batch.num_rows) if row in removals]
    for row in mine:
        reason, ref = removals[row]
        quarantine.append({"modality": modality, "source_file": batch["source_file"][row - offset].as_py(),
                           "position": batch["position"][row - offset].as_py(), "stage": "curate",
                           "reason": reason, "id": ids[row - offset], "duplicate_of": None if ref is None else id_of[ref]})
    keep = np.ones(batch.num_rows, bool)
    keep[np.array(mine, np.int64) - offset] = False
    writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    return int(keep.sum())


def curate(cfg: CurateConfig, paths: Paths) -> dict:
    """Dedup and filter 03_validated into 04_curated; write the quarantine and corpus statistics."""
    started = time.perf_counter()
    inputs = {m: paths.validated / f"{m}.parquet" for m in MODALITIES}
    present = {m: p for m, p in inputs.items() if p.exists()}
    if not present:
        names = ", ".join(f"{m}.parquet" for m in MODALITIES)
        raise FileNotFoundError(f"no validated data in {paths.validated} (none of {names}): run `fm validate` first")
    previous = read_quarantine(paths.validated / "quarantine.parquet")

    counts, stats, quarantine, outputs = {}, [], [], []
    for modality in MODALITIES:
        out = paths.curated / f"{modality}.parquet"
        if modality not in present:
            out.unlink(missing_ok=True)  # the curated layer mirrors the validated one
            continue
        paths.curated.mkdir(parents=True, exist_ok=True)
        counts[modality], rows, removed = curate_modality(present[modality], out, modality, cfg)
        outputs.append(str(out))
        stats += rows
        quarantine += removed

    stats_table = pa.Table.from_pylist(stats, schema=STATS_SCHEMA)
    write_parquet(stats_table, paths.curated / "stats.parquet")
    write_quarantine(previous, quarantine, paths.quarantine)
    outputs += [str(paths.curated / "stats.parquet"), str(paths.quarantine)]
    return {"stage": "curate", "counts": counts, "stats": stats, "outputs": outputs,
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
