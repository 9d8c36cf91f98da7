"""Admission and rows: which sequences run (each in its own KV row) and which wait.

Continuous batching: sequences arrive in the inbox from any thread, wait in arrival order, and
are admitted into free rows between decode steps, as soon as a row is free and their adapter is
resident; a finished sequence frees its row at once. Rows are handed out lowest first, so the
running rows stay packed at the front and a decode step runs over rows 0..n-1 only.
Everything but `submit` and the counters runs on the engine thread.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from typing import Callable

from plural.serve.sequence import Sequence


class QueueFull(Exception):
    """More sequences wait than `max_queue` allows (answered 429)."""


class EngineStopped(Exception):
    """The engine is shutting down (answered 503)."""


class Scheduler:
    def __init__(self, rows: int, max_queue: int, prefill_tokens: int | None = None):
        self.max_queue = max_queue
        # Prompt tokens one prefill may take (vLLM's max_num_batched_tokens, without splitting a
        # prompt: one longer than the budget is prefilled alone). A burst of requests is then
        # prefilled in groups with decode steps between them, so the first answers start after one
        # group's prefill rather than after all of them (issue 19: 16 prompts prefilled together
        # made every first token wait 2.9 s on a 2-core AVX2 CPU). None: no budget.
        self.prefill_tokens = prefill_tokens
        self.free_rows = list(range(rows))  # a heap
        self.rows: list[Sequence | None] = [None] * rows
        self.waiting: deque[Sequence] = deque()
        self.inbox: deque[Sequence] = deque()
        self.lock = threading.Lock()
        self.stopping = False

    # ---- any thread -------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` together, or refuse them all (QueueFull, EngineStopped)."""
        with self.lock:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            queued = len(self.waiting) + len(self.inbox)
            if queued + len(seqs) > self.max_queue + len(self.free_rows):
                raise QueueFull(f"{queued} requests are waiting (max_queue {self.max_queue})")
            self.inbox.extend(seqs)

    def queue_depth(self) -> int:
        return len(self.waiting) + len(self.inbox)

    def running(self) -> int:
        return sum(s is not None for s in self.rows)

    # ---- the engine thread ----------------------------------------------------------------------

    def take_inbox(self) -> None:
        with self.lock:
            self.waiting.extend(self.inbox)
            self.inbox.clear()

    def drop_cancelled(self) -> tuple[list[Sequence], list[Sequence]]:
        """(running, waiting) sequences whose owner cancelled them; the waiting ones leave the queue."""
        running = [s for s in self.rows if s is not None and s.cancelled]
        waiting = [s for s in self.waiting if s.cancelled]
        if waiting:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return running, waiting

    def admit(self, ready: Callable[[Sequence], bool]) -> list[Sequence]:
        """Move waiting sequences into free rows, in arrival order, skipping those not `ready` (their
        adapter is not resident yet), up to the prefill token budget (the first admitted one always
        fits); `ready` is asked only while a row is free and the budget not spent."""
        admitted, keep, tokens, spent = [], deque(), 0, False
        while self.waiting:
            s = self.waiting.popleft()
            # Once a prompt does not fit, later (shorter) ones wait too: arrival order is kept.
            spent = spent or (self.prefill_tokens is not None and bool(admitted)
                              and tokens + len(s.prompt_ids) > self.prefill_tokens)
            if not self.free_rows or spent or not ready(s):
                keep.append(s)
                continue
            s.row = heapq.heappop(self.free_rows)
            self.rows[s.row] = s
            admitted.append(s)
            tokens += len(s.prompt_ids)
        self.waiting = keep
        return admitted

    def release(self, s: Sequence) -> None:
        """Free the row of a running sequence (no-op for one that never ran)."""
        if s.row is not None:
            self.rows[s.row] = None
            heapq.heappush(self.free_rows, s.row)
            s.row = None

    def remove_waiting(self, pred: Callable[[Sequence], bool]) -> list[Sequence]:
        out = [s for s in self.waiting if pred(s)]
        if out:
            self.waiting = deque(s for s in self.waiting if not pred(s))
        return out

    def span(self) -> int:
        """Rows 0..span-1 cover every running sequence (0 when none runs)."""
        return max((i for i, s in enumerate(self.rows) if s is not None), default=-1) + 1

    def everyone(self) -> list[Sequence]:
        with self.lock:
            return [s for s in self.rows if s is not None] + list(self.waiting) + list(self.inbox)
