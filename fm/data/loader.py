"""The pretraining data loader: fixed-length windows from the token shards, mixed by weight.

    loader = TokenLoader(shard_dir, seq_len=256, batch_size=8, weights={"text": 0.6, "code": 0.4})
    x, y, domains = loader.next_batch()        # (B, T) inputs, (B, T) targets, (B,) modality ids
    state = loader.state_dict(); loader.load_state_dict(state)

How samples are drawn. Each modality's token shards form one flat stream, cut into
non-overlapping windows of seq_len + 1 tokens; the last `val_fraction` of the windows is held
out for validation. The loader walks one *global* sample sequence, the same for any number of
processes: sample i takes its modality from a counter-based draw (seed, i) with the mixing
weights, and the k-th sample of modality m is window perm(seed, m, epoch)[k % n_windows] with
epoch = k // n_windows, so each modality reshuffles at its own epoch boundary. Process r of
world w keeps the samples i with i % w == r.

Trust. `verify_token_shards` checks every token shard against the sha256 and size that `fm shard`
wrote into manifest.json, and every token id against the tokenizer's vocabulary, in one read of
each file; the pretrain stage calls it once before training. A shard the stage door (fm.runner
check_inputs) has just hashed, unchanged since (fm.io.known_hash), is not hashed again: only
its ids are read. The loader itself checks the ids of every window it reads (a few hundred
integers), so a bad id is an error naming its shard file, never an IndexError deep in the embedding.

The state is only global counters (the sample cursor and how many windows each modality
has used), so a run resumes exactly mid-epoch or at an epoch boundary, and a checkpoint from
4 processes resumes on 2 (or 1) as long as the global batch stays the same.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fm.data.shards import load_manifest, read_token_shard
from fm.io import known_hash, remember_hash

_DRAW_BLOCK = 4096  # modality draws are made in blocks of this many samples
_READ_BYTES = 1 << 22  # verify_token_shards reads files in blocks of this many bytes
REBUILD = "rerun `fm shard` (or `fm run --from shard`)"


def verify_token_shards(shard_dir: str | Path, manifest: dict | None = None) -> int:
    """Check each token shard named in manifest.json: present, its size and sha256 as recorded, every token
    id below the tokenizer's vocab_size. One read per file (hashing and the id range in the same pass); the
    sha256 is this process's earlier one (the stage door's) when the file is unchanged since (known_hash),
    and the one computed here is kept for later. Raises FileNotFoundError or ValueError naming the file and what
    to do; returns the bytes checked."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    listed = shard_dir / "manifest.json"
    dtype, vocab_size = np.dtype(manifest["dtype"]), manifest["tokenizer"]["vocab_size"]
    checked = 0
    for entry in manifest["shards"]:
        if entry["kind"] != "tokens":
            continue
        path = shard_dir / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {listed}): {REBUILD}")
        taken, st = time.time_ns(), path.stat()
        size = st.st_size
        if size != entry["bytes"]:
            raise ValueError(f"{path} has {size} bytes, {listed} says {entry['bytes']}: the shard is truncated or was "
                             f"changed since `fm shard` wrote it; {REBUILD}")
        known = known_hash(path, st)
        digest, top, top_at, offset = (None if known else hashlib.sha256()), -1, 0, 0
        with open(path, "rb") as f:
            while block := f.read(_READ_BYTES - _READ_BYTES % dtype.itemsize):
                if digest is not None:
                    digest.update(block)
                ids = np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize)  # (n,)
                if len(ids) and int(ids.max()) > top:
                    top, top_at = int(ids.max()), offset + int(ids.argmax())
                offset += len(ids)
        if not known:
            known = digest.hexdigest()
            remember_hash(path, st, known, taken)
        if known != entry["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in {listed}: the shard is damaged or was changed since "
                             f"`fm shard` wrote it; {REBUILD}")
        if top >= vocab_size:
            raise ValueError(f"{path}: token id {top} at token {top_at} is outside the vocabulary (vocab_size {vocab_size} in "
                             f"{listed}): the shard was not made with this tokenizer; {REBUILD}")
        checked += size
    return checked


class TokenLoader:
    def __init__(
        self,
        shard_dir: str | Path,
        seq_len: int,
        batch_size: int,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        val_fraction: float = 0.02,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shard_dir = Path(shard_dir)
        manifest = load_manifest(self.shard_dir)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.modality_codes = manifest["codes"]["modality"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        window = seq_len + 1

        streams: dict[str, list[np.memmap]] = {}
        paths: dict[str, list[Path]] = {}
        for entry in manifest["shards"]:
            if entry["kind"] == "tokens":
                streams.setdefault(entry["modality"], []).append(read_token_shard(self.shard_dir / entry["path"], manifest["dtype"]))
                paths.setdefault(entry["modality"], []).append(self.shard_dir / entry["path"])
        weights = dict(weights) if weights else {m: 1.0 for m in streams}
        missing = sorted(m for m, w in weights.items() if w > 0 and m not in streams)
        if missing and len(missing) == sum(1 for w in weights.values() if w > 0):
            raise ValueError(f"mixing weights name only modalities without token shards in {self.shard_dir}: {', '.join(missing)}")
        if missing:  # a corpus without, say, triples still trains on what it has
            warnings.warn(f"no token shards for {', '.join(missing)} in {self.shard_dir}: their mixing weight is dropped")
        weights = {m: w for m, w in weights.items() if m in streams}

        self.modalities: list[str] = []
        self._shards: dict[str, list[np.memmap]] = {}
        self._paths: dict[str, list[Path]] = {}  # the files behind _shards, for error messages
        self._offsets: dict[str, np.ndarray] = {}  # cumulative token offsets of a modality's shards
        self._windows: dict[str, tuple[int, int]] = {}  # [first, end) window ids of this split
        for m in sorted(weights, key=self.modality_codes.index):
            if weights[m] <= 0:
                continue
            tokens = sum(len(s) for s in streams[m])
            n = tokens // window
            n_val = int(round(n * val_fraction)) if n > 1 else 0
            first, end = (0, n - n_val) if split == "train" else (n - n_val, n)
            if end - first <= 0:
                continue  # too little of this modality for a window in this split
            self.modalities.append(m)
            self._shards[m] = streams[m]
            self._paths[m] = paths[m]
            self._offsets[m] = np.cumsum([0] + [len(s) for s in streams[m]])
            self._windows[m] = (first, end)
        if not self.modalities:
            raise ValueError(f"no modality in {self.shard_dir} has a full window of {window} tokens for split {split!r}")
        w = np.array([weights[m] for m in self.modalities], dtype=np.float64)
        self._cum_weights = np.cumsum(w / w.sum())
        self.sample_cursor = 0
        self.used = {m: 0 for m in self.modalities}
        self._draw_cache: tuple[int, np.ndarray] | None = None
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}  # per modality: (epoch, its window permutation)

    # ------------------------------------------------------------------ sampling

    def _modality_of(self, i: int) -> int:
        block = i // _DRAW_BLOCK
        if self._draw_cache is None or self._draw_cache[0] != block:
            u = np.random.default_rng([self.seed, 1, block]).random(_DRAW_BLOCK)
            self._draw_cache = (block, np.searchsorted(self._cum_weights, u, side="right").clip(max=len(self.modalities) - 1))
        return int(self._draw_cache[1][i % _DRAW_BLOCK])

    def _window_id(self, m: str, k: int) -> int:
        first, end = self._windows[m]
        n = end - first
        epoch, pos = divmod(k, n)
        cached = self._perm_cache.get(m)
        if cached is None or cached[0] != epoch:  # once per modality and epoch, however the modalities interleave
            cached = self._perm_cache[m] = (epoch, np.random.default_rng(
                [self.seed, 2, self.modality_codes.index(m), epoch]).permutation(n))
        return first + int(cached[1][pos])

    def _read(self, m: str, window_id: int) -> np.ndarray:
        """Tokens [window_id * (T+1), +T+1) of modality m's stream, across shard boundaries."""
        length = self.seq_len + 1
        start = window_id * length
        out = np.empty(length, dtype=np.int64)
        offsets, shards, filled = self._offsets[m], self._shards[m], 0
        s = int(np.searchsorted(offsets, start, side="right")) - 1
        while filled < length:
            lo = start + filled - offsets[s]
            take = min(length - filled, len(shards[s]) - lo)
            out[filled:filled + take] = shards[s][lo:lo + take]
            if take and out[filled:filled + take].max() >= self.vocab_size:  # would be an IndexError naming no file
                at = lo + int(out[filled:filled + take].argmax())
                raise ValueError(f"{self._paths[m][s]}: token id {int(shards[s][at])} at token {at} is outside the vocabulary "
                                 f"(vocab_size {self.vocab_size} in {self.shard_dir / 'manifest.json'}): {REBUILD}")
            filled += take
            s += 1
        return out

    def epoch(self, modality: str) -> int:
        """How many full passes over `modality`'s windows this split has made."""
        first, end = self._windows[modality]
        return self.used[modality] // (end - first)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next (x, y, domains) of this process: (B, T) int64, (B, T) int64, (B,) modality ids."""
        rows, domains = [], []
        global_batch = self.batch_size * self.world_size
        for j in range(global_batch):
            i = self.sample_cursor + j
            mi = self._modality_of(i)
            m = self.modalities[mi]
            k = self.used[m]
            self.used[m] += 1  # every process counts every global sample, so counters stay global
            if i % self.world_size == self.rank:
                rows.append(self._read(m, self._window_id(m, k)))
                domains.append(self.modality_codes.index(m))
        self.sample_cursor += global_batch
        batch = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), torch.tensor(domains, dtype=torch.int64)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"sample_cursor": self.sample_cursor, "used": dict(self.used), "seed": self.seed,
                "modalities": list(self.modalities), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len or list(state["modalities"]) != self.modalities:
            raise ValueError(
                "loader state does not match this loader (seed, seq_len or modalities differ): "
                f"saved {state['seed']}/{state['seq_len']}/{state['modalities']}, now {self.seed}/{self.seq_len}/{self.modalities}"
            )
        self.sample_cursor = int(state["sample_cursor"])
        self.used = {m: int(v) for m, v in state["used"].items()}
