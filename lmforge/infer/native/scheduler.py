"""Continuous batching: which sequences run in the next forward pass, and with how many tokens.

Every step is one forward pass over a flat list of tokens. Running sequences that are decoding
contribute one token each; the rest of the step's token budget (``max_num_batched_tokens``) goes to
prompts, oldest first, cut into chunks when a prompt is longer than what is left (chunked prefill),
so a long prompt never stalls the decoding of others for more than one step's worth of tokens.

With ``prefill_wait_steps`` k > 0, new prompts may wait up to k steps while others decode, so that several
arrive in one step: a step with a prompt chunk cannot replay a CUDA graph (only pure decode steps do), and a
server whose clients send one request after another otherwise mixes a prompt into most steps. They are
admitted at once when nothing is decoding or when they would fill every free slot (waiting longer could not
batch more); at most k steps of extra time to first token (as text-generation-inference's
``max_waiting_tokens``).

When a decoding sequence needs a new KV block and none is left, the most recently admitted running
sequence is preempted: its blocks are released (its full blocks stay in the prefix cache) and it
goes back to the front of the queue, to be recomputed from its prompt plus what it has generated so
far. Nothing crashes and no output is lost; the cost is recomputation.
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lmforge.infer.native.cache import BlockManager, NoFreeBlocks


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class SamplingParams:
    """Per-sequence sampling settings, on the host; the sampler turns a batch of them into tensors."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int = -1  # -1: none; 0: the chosen token's; k: and the k most likely
    ignore_eos: bool = False
    generator: Any = None  # torch.Generator for seeded sampling (batch-independent)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


_ids = itertools.count()


@dataclass(eq=False)  # identity: the scheduler's list/deque removals must not compare token lists
class Sequence:
    """One generated sequence: its tokens, its KV blocks, and how it ends."""

    token_ids: list[int]
    max_tokens: int
    params: SamplingParams
    adapter: int = -1  # LoRA slot; -1 = base model
    stop_ids: frozenset[int] = frozenset()
    stop_strings: Any = None  # a StopStrings, checked on the host by the engine
    on_token: Callable[["Sequence"], None] | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int = 0
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks registered
    finish_reason: str | None = None
    aborted: bool = False
    logprobs: list[tuple[int, float, list[int] | None, list[float] | None]] = field(default_factory=list)
    error: BaseException | None = None  # why the engine could not finish it (raised to the caller)
    images: Any = None  # a vision.RequestMedia (shared by a request's n sequences), None for text
    # 1 while the last entry of token_ids is a placeholder for a token sampled on the device and not read back
    # yet (the engine's asynchronous scheduling); the next step takes it from the device.
    num_pending: int = 0
    row: int = -1  # its row of the scheduler's block table (while running; kept until the row is taken again)
    # perf_counter() when the engine got it, first admitted to a step, and had its first token on the host
    t_arrival: float = 0.0
    t_admitted: float = 0.0
    t_first: float = 0.0

    @property
    def cache_salt(self) -> int | None:
        """Folded into the first block's hash: prompts with equal ids but other images or videos share no blocks."""
        return self.images.digest if self.images is not None else None

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len


class Scheduler:
    """Decides each step's work; the engine runs it and reports back through :meth:`advance`."""

    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_wait_steps: int = 0):
        if prefill_wait_steps < 0:
            raise ValueError(f"prefill_wait_steps must be 0 or more, got {prefill_wait_steps}")
        self.blocks = blocks
        self.prefill_wait_steps = prefill_wait_steps
        self.held = 0  # steps in a row that left waiting prompts out (prefill_wait_steps)
        self.num_held = 0  # ... and in all
        self.bs = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0
        self.watermark = max(1, blocks.num_blocks // 100)  # room kept for running sequences' next blocks
        self.dropped: list[Sequence] = []  # aborted sequences finished by schedule(), for the engine to report
        # Every running sequence's block ids, one row each, written as blocks are allocated: a step's block
        # table is then one numpy gather instead of a Python copy of every sequence's block list (about 0.4 ms
        # of host time per 256-sequence step). A row freed by a finished sequence keeps its ids until reused.
        self.table = np.zeros((max_num_seqs, 16), dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its next tokens to compute) for the next forward pass.

        Decoding sequences come first (one token each), then prompt chunks.
        """
        self._drop_aborted()
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = self.num_preempted
        i = 0
        while i < len(self.running):  # decodes and unfinished prompt chunks of running sequences
            seq = self.running[i]
            if seq.num_pending and seq.num_output >= seq.max_tokens:
                i += 1  # its last token is in flight: it ends when that token is read back
                continue
            todo = len(seq.token_ids) - seq.num_computed
            n = min(todo, budget) if todo > 1 else 1
            if n <= 0 or budget <= 0:
                i += 1
                continue
            if not self._grow(seq, n):
                # Out of blocks: preempt from the back until this sequence fits (or it was the back).
                while not self._grow(seq, n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue  # it preempted itself; running[i] is now the next sequence
            out.append((seq, n))
            budget -= n
            i += 1
        if self.waiting and not self._admit_now(out):
            self.held += 1
            self.num_held += 1
            return out
        self.held = 0
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.num_preempted == preempted):  # no admissions in a step that had to preempt
            seq = self.waiting[0]
            if not seq.blocks:  # fresh (or preempted): reuse cached blocks of its prefix
                seq.blocks, seq.block_hashes = self.blocks.match_prefix(
                    seq.token_ids, seq.adapter, max_tokens=len(seq.token_ids) - 1, salt=seq.cache_salt)
                seq.num_computed = len(seq.blocks) * self.bs
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            need = -(-(seq.num_computed + n) // self.bs) - len(seq.blocks)
            if need > self.blocks.num_available - (self.watermark if self.running else 0):
                # Wait for running sequences to finish; hold no blocks meanwhile (a waiting sequence that
                # kept its matched prefix could starve the others when preemption put it back in line).
                self.blocks.release(seq.blocks)
                seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
                break
            seq.blocks += self.blocks.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.t_admitted = seq.t_admitted or time.perf_counter()
            self.running.append(seq)
            seq.row = self._free_rows.pop()
            self._write_table(seq, 0)
            out.append((seq, n))
            budget -= n
        return out

    def _admit_now(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Whether waiting prompts join this step (always, unless ``prefill_wait_steps`` holds them back)."""
        if self.prefill_wait_steps == 0 or self.held >= self.prefill_wait_steps:
            return True
        if not scheduled or any(n > 1 for _, n in scheduled):  # nothing decoding, or already a prefill step
            return True
        return len(self.waiting) >= self.max_num_seqs - len(self.running)  # they fill every free slot

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = -(-(seq.num_computed + n) // self.bs) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            seq.blocks += self.blocks.allocate(need)
        except NoFreeBlocks:
            return False
        self._write_table(seq, len(seq.blocks) - need)
        return True

    def _write_table(self, seq: Sequence, start: int) -> None:
        """Mirror ``seq.blocks[start:]`` into its row of the block table."""
        n = len(seq.blocks)
        if n > self.table.shape[1]:
            grown = np.zeros((self.table.shape[0], max(n, 2 * self.table.shape[1])), dtype=np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        self.table[seq.row, start:n] = seq.blocks[start:]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_rows.append(seq.row)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def _drop_aborted(self) -> None:
        for seq in [s for s in (*self.running, *self.waiting) if s.aborted]:
            self.finish(seq, "abort")
            self.dropped.append(seq)

    # ---- after the forward pass --------------------------------------------------------------
    def advance(self, seq: Sequence, n: int) -> None:
        """``n`` more tokens of ``seq`` are in the cache; register the blocks that became full."""
        seq.num_computed += n
        full = min(seq.num_computed, len(seq.token_ids)) // self.bs
        while len(seq.block_hashes) < full:
            k = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            seq.block_hashes.append(self.blocks.register(
                seq.blocks[k], parent, seq.token_ids[k * self.bs:(k + 1) * self.bs], seq.adapter))

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` wherever it is (running or waiting) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._free_rows.append(seq.row)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.status, seq.finish_reason = Status.FINISHED, reason
