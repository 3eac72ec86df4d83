"""KV block ownership, the prefix cache's use of it, and whom to preempt.

A sequence writes only into blocks it holds alone (``Sequence.blocks``, mirrored in its block
table). With prefix caching on, its *full* computed blocks are registered in the pool
(:meth:`BlockManager.commit`: at the end of each prefill call, when it finishes or is preempted,
when a session turn ends) under the chain of its tokens; a sequence about to start its prefill
takes the registered blocks that continue its prefix (:meth:`BlockManager.match`, one more
reference each) and prefills from there. A registered block is never written again: only full
blocks are registered, a sequence writes from its ``num_computed`` on, and a session truncating
into a registered block first makes it its own or gives it up (:meth:`BlockManager.truncate`).
Released blocks that hold a registered prefix stay findable until the pool needs them (LRU,
``engine.kv_cache.BlockAllocator``).

When the pool runs dry the scheduler takes blocks back from the newest holder (preemption: it
recomputes later from its tokens, hitting the cache where it can); the choices of whom live
here, the acting on them in the scheduler.
"""

from __future__ import annotations

import math

from engine.kv_cache import ROOT, OutOfBlocks
from engine.scheduler.sequence import Sequence

__all__ = ["BlockManager", "newest", "unstick_victim"]


class BlockManager:
    """Gives sequences blocks from the model's KV pool, shares cached prefix blocks between them
    (``prefix_caching``), and takes blocks back."""

    def __init__(self, allocator, block_size: int, prefix_caching: bool = True):
        self.allocator = allocator
        self.block_size = block_size
        self.prefix_caching = prefix_caching

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
        """Give back all of ``seq``'s blocks (its full ones stay cached); nothing of it is in
        the cache for it any more."""
        if seq.blocks:
            self.commit(seq)
            self.allocator.free(seq.blocks[::-1])  # the tail is evicted first
            seq.blocks = []
        seq.hashes.clear()
        seq.num_computed = 0

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep the KV of the first ``n`` tokens; free the blocks past them. A kept partial
        block will be written into: if it is registered it becomes ``seq``'s alone (when no
        one else holds it) or is given up (its tokens are recomputed)."""
        self.commit(seq)
        bs = self.block_size
        seq.num_computed = min(seq.num_computed, n)
        full = seq.num_computed // bs
        keep = math.ceil(seq.num_computed / bs)
        if keep > full and self.allocator.is_registered(b := seq.blocks[full]):
            if self.allocator.refs(b) == 1:
                self.allocator.unregister(b)
            else:
                keep = full
                seq.num_computed = full * bs
        del seq.hashes[full:]
        if len(seq.blocks) > keep:
            self.allocator.free(seq.blocks[keep:][::-1])
            del seq.blocks[keep:]

    # ---------------------------------------------------------------- the prefix cache

    def commit(self, seq: Sequence) -> None:
        """Register ``seq``'s full computed blocks not registered yet (each under the chain of
        the blocks before it), so later sequences find them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed // bs, len(seq.blocks))
        hashes = seq.hashes
        if len(hashes) >= n_full:
            return
        parent = hashes[-1] if hashes else ROOT
        tokens = seq.tokens[len(hashes) * bs : n_full * bs].tolist()
        register, blocks = self.allocator.register, seq.blocks
        for k, i in enumerate(range(len(hashes), n_full)):
            parent = register(blocks[i], parent, tuple(tokens[k * bs : (k + 1) * bs]))
            hashes.append(parent)

    def match(self, seq: Sequence) -> int:
        """Before ``seq``'s prefill: take the cached blocks that continue its computed prefix
        (one reference each) and count them computed; returns the tokens gained. The last
        token is always left to compute (its logits give the next token), and only when what
        ``seq`` has ends on a block boundary can cached blocks follow it."""
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        i = len(seq.blocks)
        if seq.num_computed != i * bs:
            return 0
        self.commit(seq)
        limit = (seq.n_tokens - 1) // bs  # blocks that may come from the cache
        if i >= limit:
            return 0
        hashes, blocks, table = seq.hashes, seq.blocks, seq.table
        parent = hashes[-1] if hashes else ROOT
        tokens = seq.tokens[i * bs : limit * bs].tolist()
        lookup, acquire = self.allocator.lookup, self.allocator.acquire
        start = i
        while i < limit:
            k = (i - start) * bs
            hit = lookup(parent, tuple(tokens[k : k + bs]))
            if hit is None:
                break
            parent, b = hit
            acquire(b)
            table[i] = b
            blocks.append(b)
            hashes.append(parent)
            i += 1
        gained = (i - start) * bs
        seq.num_computed += gained
        return gained

    def unmatch(self, seq: Sequence, gained: int) -> None:
        """Give back what :meth:`match` just took (``seq`` waits for another step)."""
        if gained:
            self.truncate(seq, seq.num_computed - gained)

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
