"""Sparse Transformer attention patterns (Child et al. 2019) as boolean masks for SDPA.

A mask is (T, T) bool, True where query i may attend to key j, and always causal (j <= i):

    local    j > i - window                                      the previous `window` tokens, self included
    strided  local, or (i - j) % stride == 0                     plus every stride-th token back
    fixed    j // stride == i // stride, or j % stride >= stride - summary
                                                                 own block of `stride` tokens, plus the
                                                                 last `summary` "summary" positions of every block

Every pattern depends only on absolute positions, so the mask for a shorter sequence (or the rows
of a KV-cached decode step) is a slice of the mask built once for the longest one: the decoder
builds it once for `seq_len` and slices `mask[start:start + T, :start + T]`. `build_mask` is also
cached per (pattern, T, window, stride, summary) for callers that want masks directly.

    >>> build_mask("local", 4, window=2).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import functools

import torch

PATTERNS = ("dense", "local", "strided", "fixed")


@functools.lru_cache(maxsize=16)
def build_mask(pattern: str, T: int, window: int = 0, stride: int = 0, summary: int = 1) -> torch.Tensor:
    """The (T, T) bool mask of `pattern` (True = may attend), causal; on CPU, treat as read-only."""
    if pattern in ("local", "strided") and window < 1:
        raise ValueError(f"{pattern} attention needs window >= 1, got {window}")
    if pattern in ("strided", "fixed") and stride < 1:
        raise ValueError(f"{pattern} attention needs stride >= 1, got {stride}")
    if pattern == "fixed" and not 1 <= summary <= stride:
        raise ValueError(f"fixed attention needs 1 <= summary <= stride, got summary={summary}, stride={stride}")
    i = torch.arange(T)[:, None]  # (T, 1) query positions
    j = torch.arange(T)[None, :]  # (1, T) key positions
    causal = j <= i  # (T, T)
    if pattern == "dense":
        allowed = causal
    elif pattern == "local":
        allowed = i - j < window
    elif pattern == "strided":
        allowed = (i - j < window) | ((i - j) % stride == 0)
    elif pattern == "fixed":
        allowed = (j // stride == i // stride) | (j % stride >= stride - summary)
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")
    return causal & allowed  # (T, T)
