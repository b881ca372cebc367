"""Decides what each step computes: decodes first, then prefill chunks, then new sequences.

Per step a token budget (``max_batch_tokens``) is filled in that order, so running requests keep
decoding while long prompts are prefilled in chunks beside them, and a request that cannot start yet
(its adapter still loading) does not block those behind it (one waiting for device rows holds back the
adapter requests behind it: ``Core``'s ``try_start``). When KV blocks run out
mid-decode the newest running sequence is preempted (its blocks freed, recomputed later). A starting
sequence takes the KV of its longest cached prefix (full blocks with the same tokens and key, those
computed earlier or in this very step) and computes only the rest.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from .kv_cache import BlockManager, extend_block_hashes
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_running: int) -> None:
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self, try_start: Callable[[Sequence], bool],
                 on_preempt: Callable[[Sequence], None]) -> list[tuple[Sequence, int]]:
        """Return (sequence, tokens to compute) for this step.

        ``try_start(seq)`` pins what a waiting sequence needs (its adapter) and says whether it may
        start now; ``on_preempt(seq)`` releases it again.
        """
        budget = self.max_batch_tokens
        plan: list[tuple[Sequence, int]] = []
        # 1. decodes of running sequences (one token each), growing their KV by a block when needed
        decoding = [s for s in self.running if s.num_pending == 1]
        for seq in decoding:
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim, on_preempt)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq.block_table, seq.num_computed + 1)
            self._plan(plan, seq, 1)
            budget -= 1
        # 2. prefill chunks of running sequences admitted earlier
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_pending > 1:
                n = min(seq.num_pending, budget)
                self._plan(plan, seq, n)
                budget -= n
        # 3. admit waiting sequences; their whole prompt's blocks are reserved now
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            shared = self.blocks.match(self._reusable_hashes(seq))
            if not self.blocks.can_grow(seq.block_table, len(seq.token_ids), shared):
                self.waiting.appendleft(seq)  # keep FIFO for KV: a big prompt is not starved
                break
            if not try_start(seq):
                skipped.append(seq)
                continue
            self.blocks.share(seq.block_table, shared)
            seq.num_computed, seq.num_registered = len(shared) * self.blocks.block_size, len(shared)
            if seq.cached_tokens is None:  # reported once: what the request's first start found
                seq.cached_tokens = seq.num_computed
            self.blocks.grow(seq.block_table, len(seq.token_ids))
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            self._plan(plan, seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return plan

    def _reusable_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full blocks a starting sequence may take from the prefix cache: never its
        last token (its logits are needed) nor prompt positions it still has to score."""
        usable = len(seq.token_ids) - 1
        if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len:
            usable = min(usable, len(seq.prompt_logprobs) - 1)
        bs = self.blocks.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, usable // bs * bs, bs, seq.cache_key)
        return seq.block_hashes[:usable // bs]

    def _plan(self, plan: list[tuple[Sequence, int]], seq: Sequence, n: int) -> None:
        """Plan ``n`` tokens of ``seq`` and offer the blocks they fill to the prefix cache at once, so
        a sequence admitted later in this step (an equal prompt sent beside it, another sample of
        it) shares them: each layer writes the step's K/V before its attention reads them."""
        plan.append((seq, n))
        bs, upto = self.blocks.block_size, seq.num_computed + n
        if upto // bs > seq.num_registered:
            extend_block_hashes(seq.block_hashes, seq.token_ids, upto, bs, seq.cache_key)
            # only the blocks this step fills: the hashes of a prompt's later blocks exist already
            # (computed at admission), and a sequence cancelled or preempted mid-prefill must leave
            # no block cached whose KV was never written
            self.blocks.register(seq.block_table, seq.block_hashes[:upto // bs], seq.num_registered)
            seq.num_registered = upto // bs

    def _preempt(self, seq: Sequence, on_preempt: Callable[[Sequence], None]) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = seq.num_registered = 0
        seq.status = Status.WAITING
        on_preempt(seq)
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
