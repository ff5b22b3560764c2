"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and prefix caching by hash.

The cache tensors live in the model runner; this module only decides which block ids a sequence
owns. A full block is identified by the hash of (previous block's hash, its token ids, its LoRA
adapter), so two requests that share a prompt prefix share the blocks holding it; a request's salt
(the digest of its images) stands in for the first block's parent, so equal ids with other pixels
share nothing. A block whose last owner finished keeps its hash and waits in an LRU pool: a later
request with the same prefix picks it up again, and allocation evicts the least recently used such
block only when no never-used block is left.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation finds neither a free nor an evictable block."""


def block_hash(parent: int | None, tokens: Sequence[int], adapter: int) -> int:
    return hash((parent, tuple(tokens), adapter))


class BlockManager:
    """Owns block ids ``1..num_blocks-1``; block 0 is a scratch block for padded rows of a batch."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody owns, oldest first
        self.free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.hits = 0  # tokens served from the prefix cache (for metrics)

    # ---- capacity ----------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    # ---- allocation --------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            h = self.hash_of[block]
            if h is not None and self.cached.get(h) == block:
                del self.cached[h]
            self.hash_of[block] = None
        else:
            raise NoFreeBlocks("no free KV-cache block")
        self.ref[block] = 1
        return block

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise NoFreeBlocks(f"{n} blocks asked, {self.num_available} available")
        return [self._take() for _ in range(n)]

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free or evictable."""
        for block in reversed(blocks):  # tail blocks are evicted before the prefix they extend
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.hash_of[block] is not None and self.cached.get(self.hash_of[block]) == block:
                    self.evictable[block] = None
                else:
                    self.hash_of[block] = None
                    self.free.append(block)

    # ---- prefix caching ----------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], adapter: int, max_tokens: int,
                     salt: int | None = None) -> tuple[list[int], list[int]]:
        """Blocks already holding the longest cached prefix of ``tokens`` (at most ``max_tokens`` tokens).

        Returns (block ids, their hashes); each returned block gains a reference.
        """
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.prefix_caching:
            return blocks, hashes
        bs = self.block_size
        parent = salt
        for i in range(min(len(tokens), max_tokens) // bs):
            h = block_hash(parent, tokens[i * bs:(i + 1) * bs], adapter)
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                self.evictable.pop(block, None)
            self.ref[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        self.hits += len(blocks) * bs
        return blocks, hashes

    def register(self, block: int, parent: int | None, tokens: Sequence[int], adapter: int) -> int:
        """Record a block that now holds ``tokens`` (a full block) so later prompts can share it."""
        h = block_hash(parent, tokens, adapter)
        if self.prefix_caching:
            if h not in self.cached:
                self.cached[h] = block
            self.hash_of[block] = h
        return h

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a weight update their keys and values are stale)."""
        for block in list(self.evictable):
            self.hash_of[block] = None
            self.free.append(block)
        self.evictable.clear()
        self.cached.clear()
        for block in range(self.num_blocks):
            self.hash_of[block] = None
