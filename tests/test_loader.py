"""The pretraining loader: exact windows from the shards, deterministic mixing, exact resume
(mid-epoch and across an epoch boundary), and the same global stream on any process count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm.data.loader import TokenLoader, verify_token_shards
from fm.data.shards import load_manifest, read_token_shard


def stream(shard_dir, modality) -> np.ndarray:
    m = load_manifest(shard_dir)
    parts = [np.asarray(read_token_shard(shard_dir / s["path"], m["dtype"])) for s in m["shards"]
             if s["kind"] == "tokens" and s["modality"] == modality]
    return np.concatenate(parts).astype(np.int64)


def test_windows_are_exact_slices_of_the_stream(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    loader = TokenLoader(shard_dir, seq_len=32, batch_size=4, weights={"text": 1, "code": 1}, seed=3)
    flat = {m: stream(shard_dir, m) for m in ("text", "code")}
    codes = load_manifest(shard_dir)["codes"]["modality"]
    seen = set()
    for _ in range(20):
        x, y, domains = loader.next_batch()
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        for row_x, row_y, dom in zip(x, y, domains):
            tokens = flat[codes[dom]]
            window = torch.cat([row_x, row_y[-1:]]).numpy()
            starts = np.flatnonzero(tokens[: len(tokens) - 32] == window[0])
            matches = [s for s in starts if s % 33 == 0 and np.array_equal(tokens[s:s + 33], window)]
            assert matches, "window is not an aligned slice of its modality's stream"
            seen.add((codes[dom], matches[0]))
    assert {m for m, _ in seen} == {"text", "code"}  # both modalities drawn


def test_mixing_weights_are_respected(sample_shards):
    loader = TokenLoader(sample_shards.tokens / "shards", seq_len=16, batch_size=64, weights={"text": 3, "code": 1}, seed=0)
    domains = torch.cat([loader.next_batch()[2] for _ in range(30)])
    share_text = (domains == 0).float().mean().item()
    assert 0.70 < share_text < 0.80  # 0.75 expected, 1920 draws
    only_code = TokenLoader(sample_shards.tokens / "shards", seq_len=16, batch_size=8, weights={"code": 1, "text": 0})
    assert set(only_code.next_batch()[2].tolist()) == {1}


def test_resume_mid_epoch_and_across_epoch_boundary(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    make = lambda: TokenLoader(shard_dir, seq_len=64, batch_size=8, weights={"text": 1}, seed=1)
    full = make()
    n_windows = full._windows["text"][1] - full._windows["text"][0]
    batches_per_epoch = n_windows // 8
    reference = [full.next_batch()[0] for _ in range(batches_per_epoch * 2 + 3)]
    assert full.epoch("text") == 2
    # resume at several points, the exact epoch boundary among them
    for cut in (1, batches_per_epoch, batches_per_epoch * 2):
        first = make()
        for _ in range(cut):
            first.next_batch()
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        for i in range(cut, len(reference)):
            assert torch.equal(resumed.next_batch()[0], reference[i]), (cut, i)
    # every window is used once per epoch, and the second epoch is a different order
    first_epoch = torch.cat(reference[:batches_per_epoch])
    second_epoch = torch.cat(reference[batches_per_epoch:2 * batches_per_epoch])
    assert len({tuple(r.tolist()) for r in first_epoch}) == batches_per_epoch * 8
    assert not torch.equal(first_epoch, second_epoch)


def test_same_global_stream_on_any_process_count(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    one = TokenLoader(shard_dir, seq_len=16, batch_size=8, seed=5)
    two = [TokenLoader(shard_dir, seq_len=16, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x1 = one.next_batch()[0]
        x2 = [l.next_batch()[0] for l in two]
        # sample i goes to rank i % 2: interleave the two halves back into the global batch
        merged = torch.stack([x2[i % 2][i // 2] for i in range(8)])
        assert torch.equal(x1, merged)
    # and a 2-process state resumes on 1 process
    one_again = TokenLoader(shard_dir, seq_len=16, batch_size=8, seed=5)
    one_again.load_state_dict(two[0].state_dict())
    assert torch.equal(one_again.next_batch()[0], one.next_batch()[0])


def test_validation_windows_are_held_out(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    train = TokenLoader(shard_dir, seq_len=32, batch_size=1, weights={"text": 1}, val_fraction=0.1)
    val = TokenLoader(shard_dir, seq_len=32, batch_size=1, weights={"text": 1}, split="val", val_fraction=0.1)
    (t0, t1), (v0, v1) = train._windows["text"], val._windows["text"]
    assert t1 == v0 and v1 > v0 and t0 == 0


def test_bad_arguments_are_clear(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    with pytest.raises(ValueError, match="only modalities without token shards.*image_text"):
        TokenLoader(shard_dir, seq_len=16, batch_size=1, weights={"image_text": 1})
    with pytest.warns(UserWarning, match="no token shards for triples"):
        partial = TokenLoader(shard_dir, seq_len=16, batch_size=1, weights={"text": 1, "triples": 1})
    assert partial.modalities == ["text"]
    loader = TokenLoader(shard_dir, seq_len=16, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        TokenLoader(shard_dir, seq_len=32, batch_size=1, seed=0).load_state_dict(loader.state_dict())


def test_intact_shards_pass_verification(sample_shards):
    shard_dir = sample_shards.tokens / "shards"
    token_bytes = sum(e["bytes"] for e in load_manifest(shard_dir)["shards"] if e["kind"] == "tokens")
    assert verify_token_shards(shard_dir) == token_bytes > 0  # every token shard read once, nothing refused


def test_each_modality_keeps_its_permutation_while_modalities_interleave(sample_shards, monkeypatch):
    """One window permutation per modality and epoch, however the mixed draws alternate (not one per switch of
    modality, which made batch time grow with the corpus); batches and resume state are what the cache-less
    rule gives: window perm(seed, m, epoch)[k % n] for the k-th sample of modality m."""
    shard_dir = sample_shards.tokens / "shards"
    made = []
    real_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: made.append(seed) or real_rng(seed))
    loader = TokenLoader(shard_dir, seq_len=16, batch_size=16, weights={"text": 1, "code": 1}, seed=5)
    batches = [loader.next_batch() for _ in range(10)]
    monkeypatch.undo()
    perms = [s for s in made if isinstance(s, list) and len(s) == 4 and s[1] == 2]
    assert sorted(map(tuple, perms)) == sorted({tuple(s) for s in perms})  # each (modality, epoch) built once
    assert {s[2] for s in perms} == {0, 1}  # text and code, both drawn
    codes = load_manifest(shard_dir)["codes"]["modality"]
    flat = {m: stream(shard_dir, m) for m in ("text", "code")}
    used = {"text": 0, "code": 0}
    for x, y, domains in batches:
        for row_x, row_y, dom in zip(x, y, domains):
            m = codes[dom]
            first, end = loader._windows[m]
            epoch, pos = divmod(used[m], end - first)
            window = first + int(real_rng([5, 2, codes.index(m), epoch]).permutation(end - first)[pos])
            assert np.array_equal(torch.cat([row_x, row_y[-1:]]).numpy(), flat[m][window * 17:(window + 1) * 17])
            used[m] += 1
    assert loader.state_dict()["used"] == used and loader.state_dict()["sample_cursor"] == 160
