"""How many turns the front relays at once: a bound in total and one per worker.

Past either bound a turn is refused at once with RESOURCE_EXHAUSTED and a retry hint, never queued: the front's
memory stays bounded whatever the callers do, and a caller learns right away that it should back off (or go to
another front). A worker's own bound (its engine's batch plus waiting queue) stays the last word: the front's
per-worker bound only saves a round trip to a worker that would refuse, and moves the turn to the next worker in
the session's rendezvous order instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common.errors import Overloaded, Unavailable


class Admission:
    """Counts the turns in flight, in total and per worker (single event loop: no locking needed)."""

    def __init__(self, max_total: int = 0, max_per_worker: int = 0, retry_after_s: float = 0.5) -> None:
        """0 means unbounded (max_total) or "the worker's own batch + queue size" (max_per_worker)."""
        self.max_total = max_total
        self.max_per_worker = max_per_worker
        self.retry_after_s = retry_after_s
        self.total = 0
        self.closed = False  # draining: no new turns
        self._per_worker: dict[str, int] = {}

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Holds one of the front's turn places for the block; Overloaded when all are taken, Unavailable once
        the front drains."""
        if self.closed:
            raise Unavailable("this front is shutting down; retry on another one")
        if self.max_total and self.total >= self.max_total:
            raise Overloaded(f"this front is relaying its limit of {self.max_total} turns", self.retry_after_s)
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1

    def limit(self, worker_id: str, worker_limit: int) -> int:
        """The bound for one worker: the configured one, else what the worker says it holds (0: unbounded)."""
        return self.max_per_worker or worker_limit

    def in_flight(self, worker_id: str) -> int:
        return self._per_worker.get(worker_id, 0)

    def has_room(self, worker_id: str, worker_limit: int = 0) -> bool:
        limit = self.limit(worker_id, worker_limit)
        return not limit or self.in_flight(worker_id) < limit

    @contextmanager
    def on_worker(self, worker_id: str) -> Iterator[None]:
        """Counts a turn against one worker for the block."""
        self._per_worker[worker_id] = self._per_worker.get(worker_id, 0) + 1
        try:
            yield
        finally:
            left = self._per_worker[worker_id] - 1
            if left:
                self._per_worker[worker_id] = left
            else:
                del self._per_worker[worker_id]

    def close(self) -> None:
        """Takes no more turns (the turns in flight go on)."""
        self.closed = True

    async def drained(self, timeout_s: float | None) -> bool:
        """Waits until no turn is in flight; False when `timeout_s` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.total:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
