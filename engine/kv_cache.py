"""The paged KV cache: a fixed pool of blocks shared by all sequences, and its free list.

A sequence owns a list of block ids (its block table); position p of the sequence lives in
block table[p // block_size], slot p % block_size. Blocks are handed out and taken back whole,
so sequences of any length share the pool without fragmentation. Full blocks are shared read-only
between sequences by reference count (automatic prefix caching, :class:`BlockAllocator`).
"""

from __future__ import annotations

import collections
import itertools

import numpy as np


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for."""


ROOT = 0  # the prefix id a sequence's first block continues


class BlockAllocator:
    """Blocks by reference count, and the prefix cache over them.

    A block with references is in use (by sequences, and never handed out again until released).
    One without is free: truly free (a stack), or *cached*: it still holds the KV of a full block
    registered under its prefix, findable by :meth:`lookup`, on an LRU list that
    :meth:`allocate` evicts from (least recently released first) only when no truly free block
    is left. ``num_free`` counts both kinds; ``num_used`` the blocks with references.

    The prefix cache maps ``(parent prefix id, the block's tokens)`` to ``(prefix id, block)``:
    a prefix id names one registered full block and, through its parent, every token before it
    (``ROOT`` for a sequence's first block). Ids are never reused, so a match is exact (no hash
    collisions): a block registered under a parent that was evicted since is never found again
    and ages out of the LRU list. The pool belongs to one model, which scopes the keys to it.
    Only full blocks are registered, and a registered block is never written again.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        # a list, not numpy: its item stores cost ~30 ns where a numpy call costs tens of us
        # right after a model call has flushed the caches (decode steps grow blocks one at a time)
        self._refs = [0] * num_blocks
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._key: list[tuple | None] = [None] * num_blocks   # a registered block's key
        self._prefix: dict[tuple, tuple[int, int]] = {}       # key -> (prefix id, block)
        self._ids = itertools.count(ROOT + 1)
        self.evictions = 0                                   # cached blocks reused for new KV

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix (in use or evictable)."""
        return len(self._prefix)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with one reference each: truly free ones first, then the least recently
        released cached ones (their prefixes are forgotten)."""
        free = self._free
        if n > len(free) + len(self._evictable):
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} of {self.num_blocks} free")
        refs = self._refs
        blocks = []
        for _ in range(n):
            if free:
                b = free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._prefix[self._key[b]]
                self._key[b] = None
                self.evictions += 1
            refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; one left without any is free again (cached, and the
        most recently released, if it holds a registered prefix). Release a sequence's blocks
        last first, so its tail is evicted before the prefix others are likelier to share."""
        refs = self._refs
        for b in blocks:
            r = refs[b]
            if r <= 0:
                raise ValueError(f"KV block {b} freed twice")
            refs[b] = r - 1
            if r == 1:
                if self._key[b] is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None

    # ------------------------------------------------------------------ the prefix cache

    def lookup(self, parent: int, tokens: tuple) -> tuple[int, int] | None:
        """``(prefix id, block)`` of the registered block holding ``tokens`` after ``parent``."""
        return self._prefix.get((parent, tokens))

    def acquire(self, block: int) -> None:
        """One more reference to a block found by :meth:`lookup` (no longer evictable)."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, parent: int, tokens: tuple) -> int:
        """Make a full block (in use, its KV computed) findable after ``parent``; returns its
        prefix id. If an equal block is registered already, that one's id (this block stays
        unregistered: freed, it is simply free)."""
        key = (parent, tokens)
        hit = self._prefix.get(key)
        if hit is not None:
            return hit[0]
        if self._key[block] is not None:
            raise ValueError(f"KV block {block} is registered already")
        pid = next(self._ids)
        self._prefix[key] = (pid, block)
        self._key[block] = key
        return pid

    def unregister(self, block: int) -> None:
        """Forget a block's prefix (its only holder is about to write into it)."""
        key = self._key[block]
        if key is not None:
            del self._prefix[key]
            self._key[block] = None

    def refs(self, block: int) -> int:
        return self._refs[block]

    def is_registered(self, block: int) -> bool:
        return self._key[block] is not None

    def clear_cache(self) -> int:
        """Forget every evictable cached block (they become truly free); returns how many."""
        n = len(self._evictable)
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self._prefix[self._key[b]]
            self._key[b] = None
            self._free.append(b)
        return n


class KVCache:
    """Keys and values for every layer, float32. Values are [layers, blocks, kv_heads,
    block_size, head_dim]; keys are transposed within a block, [..., head_dim, block_size], so
    attention scores a whole block with vector operations."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        # np.zeros maps pages lazily: an unused pool costs address space, not memory.
        self.k = np.zeros(shape[:3] + (head_dim, block_size), dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.v[:, 0, :, 0, :].size * 4
