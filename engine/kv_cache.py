"""The paged KV cache: a fixed pool of blocks shared by all sequences, and its free list.

A sequence owns a list of block ids (its block table); position p of the sequence lives in
block table[p // block_size], slot p % block_size. Blocks are handed out and taken back whole,
so sequences of any length share the pool without fragmentation.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        # a bytearray, not numpy: its item stores cost ~30 ns where a numpy call costs tens of us
        # right after a model call has flushed the caches (decode steps grow blocks one at a time)
        self._used = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._used[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._used[b]:
                raise ValueError(f"KV block {b} freed twice")
            self._used[b] = 0
            self._free.append(b)


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
