"""KV block ownership and whom to preempt.

Every block a sequence writes is one it owns (``Sequence.blocks``, mirrored in its block table);
no sequence ever writes into another's blocks. When the pool runs dry the scheduler takes blocks
back from the newest holder (preemption: it recomputes later from its tokens); the choices of
whom live here, the acting on them in the scheduler.
"""

from __future__ import annotations

import math

from engine.kv_cache import OutOfBlocks
from engine.scheduler.sequence import Sequence

__all__ = ["BlockManager", "newest", "unstick_victim"]


class BlockManager:
    """Gives sequences blocks from the model's KV pool and takes them back."""

    def __init__(self, allocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size

    def ensure(self, seq: Sequence, n_tokens: int) -> bool:
        """Make ``seq`` own enough blocks to hold ``n_tokens`` positions. False if the pool is dry."""
        need = math.ceil(n_tokens / self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            new = self.allocator.allocate(need)
        except OutOfBlocks:
            return False
        table = seq.table
        for k, b in enumerate(new, len(seq.blocks)):  # scalar stores: a decode grows one block
            table[k] = b
        seq.blocks.extend(new)
        return True

    def free(self, seq: Sequence) -> None:
        """Give back all of ``seq``'s blocks; nothing of it is in the cache any more."""
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        seq.num_computed = 0

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the KV of the first ``n`` tokens; free the blocks past them."""
        seq.num_computed = min(seq.num_computed, n)
        keep = math.ceil(seq.num_computed / self.block_size)
        if len(seq.blocks) > keep:
            self.allocator.free(seq.blocks[keep:])
            del seq.blocks[keep:]

    @property
    def num_used(self) -> int:
        return self.allocator.num_used


def newest(seqs) -> Sequence:
    """The sequence that arrived last: the one to preempt."""
    return max(seqs, key=lambda s: s.stats.arrival_ns)


def unstick_victim(running, waiting) -> tuple[Sequence | None, Sequence]:
    """Nothing could run: of the live sequences, the oldest must make progress. Returns the
    newest other sequence holding blocks (None if none does), and the oldest."""
    live = list(running) + list(waiting)
    oldest = min(live, key=lambda s: s.stats.arrival_ns)
    holders = [s for s in live if s.blocks and s is not oldest]
    return (newest(holders) if holders else None), oldest
