"""Instruction examples packed into fixed-length rows: the data loader of instruction tuning and distillation.

    from fm.data.packing import PackedLoader
    loader = PackedLoader(examples, seq_len=256, batch_size=8, seed=0, rank=0, world_size=1)
    x, y, domains, doc_ids = loader.next_batch()     # (B, T) each
    logits, loss, _ = model(x, y, domains=domains, doc_ids=doc_ids)

An example is (ids, labels, domain) as fm.data.chat.ChatTemplate.encode gives them (labels aligned with
ids, -100 where no loss). It contributes len(ids) - 1 positions to a row: inputs ids[:-1], targets
labels[1:]. Rows are filled in a shuffled order (a row is closed when the next example does not fit), the
examples never cut, the tail padded
(pad id, target -100, its own doc id). `doc_ids` numbers the examples of a row, so the decoder keeps
attention and RoPE positions within each one (Decoder.forward's doc_ids): a packed example is computed
exactly as it would be alone, and its prompt tokens carry no loss.

Deterministic and resumable: epoch e's order is a permutation drawn from (seed, e); every data-parallel
rank builds the same rows and takes its own `batch_size` of each global batch. The state is (epoch,
row cursor), the same on every rank; an epoch's tail that does not fill a global batch is skipped (and an
epoch that packs into fewer rows than one global batch, whole).
"""

from __future__ import annotations

import random

import torch

from fm.data.chat import IGNORE_INDEX


class PackedLoader:
    def __init__(self, examples: list[tuple[list[int], list[int], int]], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 1, shuffle: bool = True):
        usable = [e for e in examples if 2 <= len(e[0]) <= seq_len + 1 and any(t != IGNORE_INDEX for t in e[1][1:])]
        if not usable:
            raise ValueError(f"no example fits seq_len={seq_len} with a token to learn (of {len(examples)})")
        self.examples, self.seq_len, self.batch_size = usable, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.pad_id, self.shuffle = seed, rank, world_size, pad_id, shuffle
        self.skipped = len(examples) - len(usable)  # longer than a row, or nothing to learn
        self.epoch, self.cursor = 0, 0
        self._rows: list[list[int]] | None = None  # the epoch's rows: example indices
        if len(self._epoch_rows()) < batch_size * world_size:
            raise ValueError(f"{len(usable)} examples pack into {len(self._rows)} rows of {seq_len}, fewer than one "
                             f"global batch ({batch_size} x {world_size} processes)")

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows is None:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            rows, row, used = [], [], 0
            for i in order:
                n = len(self.examples[i][0]) - 1
                if used + n > self.seq_len:
                    rows.append(row)
                    row, used = [], 0
                row.append(i)
                used += n
            rows.append(row)
            self._rows = rows
        return self._rows

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows())

    def row(self, example_indices: list[int]) -> tuple[torch.Tensor, ...]:
        """One packed row: x, y, domains, doc_ids, each (T,)."""
        T = self.seq_len
        x = torch.full((T,), self.pad_id, dtype=torch.long)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        domains = torch.zeros(T, dtype=torch.long)
        doc_ids = torch.full((T,), len(example_indices), dtype=torch.long)  # the padding is a document of its own
        at = 0
        for doc, i in enumerate(example_indices):
            ids, labels, domain = self.examples[i]
            n = len(ids) - 1
            x[at:at + n] = torch.tensor(ids[:-1])
            y[at:at + n] = torch.tensor(labels[1:])
            domains[at:at + n] = domain
            doc_ids[at:at + n] = doc
            at += n
        if at < T:
            domains[at:] = domains[at - 1]
        return x, y, domains, doc_ids

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: x, y, domains, doc_ids, each (B, T)."""
        B, W = self.batch_size, self.world_size
        tries = 0
        while self.cursor + B * W > len(self._epoch_rows()):
            # Another order can pack into fewer rows: an epoch too short for one global batch is skipped whole.
            self.epoch, self.cursor, self._rows, tries = self.epoch + 1, 0, None, tries + 1
            if tries > 100:
                raise ValueError(f"100 epochs in a row pack into fewer rows than one global batch ({B} x {W}): "
                                 f"lower batch_size or add examples")
        rows = self._epoch_rows()[self.cursor + self.rank * B: self.cursor + (self.rank + 1) * B]
        self.cursor += B * W
        return tuple(torch.stack(t) for t in zip(*(self.row(r) for r in rows)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._rows = state["epoch"], state["cursor"], None
