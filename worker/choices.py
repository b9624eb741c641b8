"""Relaying several engine turns of one request (its n choices) as one stream: the next event of any of them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common.errors import DeadlineExceeded
from worker.engine import Delta, Finished, Turn


async def next_event(turns: list[Turn], live: list[int], getters: dict[int, asyncio.Future[Any]],
                     deadline: float | None, renewal: asyncio.Task[None] | None) -> tuple[int, Delta | Finished]:
    """The next event of any live turn, with its index (in index order when several are ready). `getters` holds
    the pending reads between calls (the caller cancels them when it stops); `renewal` (the lease's) raises
    LeaseLost when it ends; DeadlineExceeded once `deadline` (time.monotonic()) passes."""
    # Fast path (a backlog of delivered events): no task and no asyncio.wait per token, same checks.
    if (renewal is None or not renewal.done()) and (deadline is None or time.monotonic() < deadline):
        for i in live:
            getter = getters.get(i)
            if getter is not None and getter.done():
                del getters[i]
                return i, getter.result()
            ready = turns[i].poll() if getter is None else None
            if ready is not None:
                return i, ready
    for i in live:
        if i not in getters:
            getters[i] = asyncio.ensure_future(turns[i].next_event())
    waiters: set[asyncio.Future[Any]] = set(getters.values())
    if renewal is not None:
        waiters.add(renewal)
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for i in live:
        getter = getters.get(i)
        if getter is not None and getter in done:
            del getters[i]
            return i, getter.result()
    if renewal is not None and renewal in done:
        renewal.result()  # raises LeaseLost
    raise DeadlineExceeded("the turn's deadline passed")
