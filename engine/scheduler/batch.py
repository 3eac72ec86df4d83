"""The decode batch: which sequences decode together, and the model's input rows for them.

A sequence joins (appended) when its prefill completes and leaves (the last row moves into its
place) when it stops running; a full rebuild only when the pool runs dry (``dirty``). Each decode
step writes each row's new token and position in place, so an unchanged batch costs no copying.
"""

from __future__ import annotations

import numpy as np

from engine.scheduler.sequence import Request, Sequence

__all__ = ["DecodeBatch"]


class DecodeBatch:
    """Row ``i`` is ``seqs[i]`` (its request ``reqs[i]``): it feeds the model ``tokens[i]`` at
    position ``positions[i]`` with block table ``tables[i]``; ``seq.row`` is its row."""

    def __init__(self, max_batch: int, max_blocks: int):
        self.seqs: list[Sequence] = []
        self.reqs: list[Request] = []
        self.tokens = np.zeros(max_batch, dtype=np.int32)
        self.positions = np.zeros(max_batch, dtype=np.int32)
        self.tables = np.zeros((max_batch, max_blocks), dtype=np.int32)
        self.dirty = True         # rebuild before the next decode
        # a step that verifies drafts: its rows (a sequence's last token and drafts), their
        # positions and sequences (rows of ``tables``), and each sequence's drafts
        self.rows = max_batch * 4
        self.row_tokens = np.zeros(self.rows, dtype=np.int32)
        self.row_positions = np.zeros(self.rows, dtype=np.int32)
        self.row_seq = np.zeros(self.rows, dtype=np.int32)
        self.drafts = [0] * max_batch

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence) -> None:
        """A sequence ready to decode takes the next row of the batch."""
        i = len(self.seqs)
        seq.row = i
        self.seqs.append(seq)
        self.reqs.append(seq.req)
        self.tokens[i] = seq.tokens[seq.n_tokens - 1]
        self.positions[i] = seq.n_tokens - 1
        self.tables[i] = seq.table
        B = i + 1
        for other in self.seqs:
            if other.max_batch < B:
                other.max_batch = B

    def remove(self, seq: Sequence) -> None:
        """The last row moves into the leaving sequence's place."""
        seqs, reqs = self.seqs, self.reqs
        i, last = seq.row, len(seqs) - 1
        if i != last:
            moved = seqs[last]
            seqs[i] = moved
            reqs[i] = reqs[last]
            self.tokens[i] = self.tokens[last]
            self.positions[i] = self.positions[last]
            self.tables[i] = self.tables[last]
            moved.row = i
        seqs.pop()
        reqs.pop()
        seq.row = -1

    def clear(self) -> None:
        """Empty the batch (it is rebuilt before the next decode)."""
        for seq in self.seqs:
            seq.row = -1
        self.seqs, self.reqs = [], []
        self.dirty = True
