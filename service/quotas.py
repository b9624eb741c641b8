"""Per-tenant limits: live sessions, and tokens (prompt + generated) per time window.

The counts live in Redis, so every front replica enforces the same limits. Sessions are counted at
CreateSession/ForkSession: a quick check before, and a recount after that undoes the new session when
concurrent creates overshot (two racing creates at the limit may both be refused; the limit is never passed).
Tokens are charged after each turn from its usage and checked before the next one: a turn that starts under
the budget runs to its end, so a window can overshoot by at most the turns in flight.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping

from common.errors import QuotaExceeded, SessionNotFound
from common.store import StateStore
from service.settings import TenantLimits


class Quotas:
    """Checks and charges a tenant's limits (0 = unlimited)."""

    def __init__(self, store: StateStore, *, max_sessions: int = 0, max_tokens: int = 0, window_s: float = 3600.0,
                 per_tenant: Mapping[str, TenantLimits] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.window_s = window_s
        self.per_tenant = dict(per_tenant or {})
        self._clock = clock  # wall clock: windows must line up across front replicas

    def session_limit(self, tenant: str) -> int:
        override = self.per_tenant.get(tenant)
        return override.max_sessions if override and override.max_sessions is not None else self.max_sessions

    def token_limit(self, tenant: str) -> int:
        override = self.per_tenant.get(tenant)
        return override.max_tokens if override and override.max_tokens is not None else self.max_tokens

    async def _over(self, tenant: str, limit: int, strictly: bool) -> bool:
        """Whether the tenant's live sessions reach (or, strictly, pass) the limit; the cheap count is an upper
        bound, so the exact one (which prunes expired sessions) runs only near the limit."""
        def over(n: int) -> bool:
            return n > limit if strictly else n >= limit

        return over(await self.store.count_sessions(tenant)) and over(
            await self.store.count_sessions(tenant, exact=True))

    async def check_session(self, tenant: str) -> None:
        """Before a new session: QuotaExceeded when the tenant already has its maximum of live sessions."""
        limit = self.session_limit(tenant)
        if limit and await self._over(tenant, limit, strictly=False):
            raise QuotaExceeded(f"tenant {tenant!r} has reached its limit of {limit} live sessions; delete sessions "
                                "(or let them expire) before creating more")

    async def confirm_session(self, tenant: str, session_id: str) -> None:
        """After a new session: if racing creates took the tenant past its limit, undoes this one."""
        limit = self.session_limit(tenant)
        if limit and await self._over(tenant, limit, strictly=True):
            with contextlib.suppress(SessionNotFound):
                await self.store.delete_session(session_id)
            raise QuotaExceeded(f"tenant {tenant!r} has reached its limit of {limit} live sessions")

    def _window(self) -> tuple[int, float]:
        """The current window's number and the seconds left in it."""
        now = self._clock()
        window = int(now // self.window_s)
        return window, (window + 1) * self.window_s - now

    async def check_tokens(self, tenant: str) -> None:
        """Before a turn: QuotaExceeded (with the time until the window ends) when the budget is spent."""
        limit = self.token_limit(tenant)
        if not limit:
            return
        window, left = self._window()
        used = await self.store.get_tokens(tenant, window)
        if used >= limit:
            raise QuotaExceeded(f"tenant {tenant!r} used {used} of its {limit} tokens in this {self.window_s:g} s "
                                f"window; retry in {math.ceil(left)} s", retry_after_s=left)

    async def charge(self, tenant: str, tokens: int) -> None:
        """After a turn: adds its tokens to the tenant's current window."""
        if tokens <= 0 or not self.token_limit(tenant):
            return
        window, left = self._window()
        await self.store.add_tokens(tenant, window, tokens, ttl_ms=math.ceil((left + self.window_s) * 1000))
