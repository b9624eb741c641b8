"""Which worker runs a turn: discovery from the Redis registry, rendezvous hashing, failover, relaying the stream.

A session goes to the highest-scoring healthy worker of its model under rendezvous hashing of (session id,
worker id): every front picks the same worker without talking to the others, and when a worker joins or
leaves only the sessions it wins or held move. That worker probably holds the session's state in its local
cache. A worker that refuses (UNAVAILABLE, RESOURCE_EXHAUSTED) before the turn started is skipped for the next
one in the order; stateless completions go to the least loaded worker instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from common.errors import (
    ERROR_KEY,
    DeadlineExceeded,
    Overloaded,
    ServeError,
    StoreUnavailable,
    Unavailable,
    WorkerLost,
    from_status,
)
from common.worker_api import WorkerLoad
from rwkv_serve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from service.admission import Admission

log = logging.getLogger(__name__)

def rendezvous_score(key: str, worker_id: str) -> int:
    """Highest random weight: a stable pseudo-random score of the pair, the same on every front."""
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, workers: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    """Workers in the key's preference order (the first is its home)."""
    return sorted(workers, key=lambda w: rendezvous_score(key, w.worker_id), reverse=True)


class WorkerDirectory:
    """The live workers from the Redis registry (re-read at most every `refresh_s`) and local failure marks."""

    def __init__(self, list_workers: Callable[[], Any], *, refresh_s: float = 1.0, suspect_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`list_workers` is an async callable returning the live workers (StateStore.list_workers)."""
        self._list_workers = list_workers
        self._refresh_s = refresh_s
        self._suspect_s = suspect_s
        self._clock = clock
        self._cache: list[WorkerLoad] = []
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        self._suspect_until: dict[str, float] = {}

    async def workers(self, model: str | None = None, *, fresh: bool = False) -> list[WorkerLoad]:
        """Registered, serving workers (of `model` when given)."""
        async with self._lock:
            if fresh or self._clock() - self._read_at >= self._refresh_s:
                self._cache = list(await self._list_workers())
                self._read_at = self._clock()
            workers = self._cache
        return [w for w in workers if w.serving and w.address and (model is None or w.model.id == model)]

    def mark_failed(self, worker: WorkerLoad) -> None:
        """The worker refused a connection: skip it for a while, even if its heartbeat is still alive."""
        self._suspect_until[worker.worker_id] = self._clock() + self._suspect_s

    def mark_ok(self, worker: WorkerLoad) -> None:
        self._suspect_until.pop(worker.worker_id, None)

    def suspect(self, worker: WorkerLoad) -> bool:
        until = self._suspect_until.get(worker.worker_id)
        if until is None:
            return False
        if self._clock() >= until:
            del self._suspect_until[worker.worker_id]
            return False
        return True

    def rank(self, ordered: list[WorkerLoad]) -> list[WorkerLoad]:
        """Keeps the order but moves suspect workers, then saturated ones, to the back (tried last, not never:
        with one worker left a stale mark must not make the model unavailable)."""
        return sorted(ordered, key=lambda w: (self.suspect(w), w.saturated))  # sorted() is stable

    async def for_session(self, session_id: str, model: str) -> list[WorkerLoad]:
        """The model's workers in the session's rendezvous order, healthy ones first."""
        workers = await self.workers(model)
        if not workers:
            workers = await self.workers(model, fresh=True)  # a worker may have just registered
        return self.rank(rendezvous_order(session_id, workers))

    async def least_loaded(self, model: str) -> list[WorkerLoad]:
        """The model's workers by load, healthy ones first (random among equals, to spread stateless work)."""
        workers = await self.workers(model)
        if not workers:
            workers = await self.workers(model, fresh=True)
        shuffled = random.sample(workers, len(workers))
        return self.rank(sorted(shuffled, key=lambda w: w.load))

    async def models(self) -> list[common_pb2.ModelInfo]:
        """One ModelInfo per served model, with its live worker count."""
        by_model: dict[str, common_pb2.ModelInfo] = {}
        for worker in await self.workers():
            info = by_model.get(worker.model.id)
            if info is None:
                info = by_model[worker.model.id] = worker.model.to_pb()
            info.workers += 1
        return [by_model[m] for m in sorted(by_model)]


class ChannelPool:
    """One grpc.aio channel per worker address, reused across turns."""

    def __init__(self, options: Sequence[tuple[str, Any]] = (),
                 credentials: grpc.ChannelCredentials | None = None, interceptors: Sequence[Any] = ()) -> None:
        """`credentials`: TLS (or mutual TLS) to the workers; None: plaintext. `interceptors`: client
        interceptors of every channel (the trace context's)."""
        self._options = list(options)
        self._credentials = credentials
        self._interceptors = list(interceptors) or None
        self._stubs: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerServiceStub]] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        entry = self._stubs.get(address)
        if entry is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options,
                                                  interceptors=self._interceptors)
            entry = self._stubs[address] = (channel, worker_pb2_grpc.WorkerServiceStub(channel))
        return entry[1]

    async def close(self) -> None:
        channels = [channel for channel, _ in self._stubs.values()]
        self._stubs.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the deadline passed before a worker took the turn")
    return left


def _error(e: grpc.aio.AioRpcError) -> ServeError:
    error = from_status(e.code(), e.details(), tuple(e.trailing_metadata() or ()))
    return error if error is not None else ServeError(e.details() or "")


# Failures that mean "this worker did not take the turn, another may".
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _worker_gone(e: grpc.aio.AioRpcError) -> bool:
    """The call failed in transport (the worker died, or cannot be reached), not with a status the worker chose:
    a worker's own errors always carry the rwkv-error trailer."""
    return e.code() == grpc.StatusCode.UNAVAILABLE and not any(k == ERROR_KEY for k, _ in e.trailing_metadata() or ())


class Router:
    """Runs worker calls on the right worker, falling over to the next candidate when one refuses."""

    def __init__(self, directory: WorkerDirectory, channels: ChannelPool, *, max_attempts: int = 3,
                 admission: Admission | None = None) -> None:
        self.directory = directory
        self.channels = channels
        self.max_attempts = max_attempts
        self.admission = admission or Admission()

    async def run_turn(self, request: worker_pb2.RunTurnRequest, candidates: list[WorkerLoad],
                       deadline: float | None = None) -> AsyncIterator[common_pb2.ChatEvent]:
        """Streams the turn's events from the first candidate that takes it.

        A worker that refuses (overloaded, draining) is skipped for the next candidate, and so is one this front
        already keeps at its in-flight bound. A worker that cannot be reached or dies during the call raises
        WorkerLost (naming it): the caller decides whether the turn may be retried elsewhere (service.turns).
        Closing this generator cancels the worker call (and so the turn, within one engine step)."""
        if not candidates:
            raise Unavailable(f"no live worker serves model {request.model!r}")
        refusals: list[ServeError] = []
        for worker in candidates[: self.max_attempts]:
            if not self.admission.has_room(worker.worker_id, worker.capacity + worker.max_queued):
                refusals.append(Overloaded(f"worker {worker.worker_id} holds as many turns as it can take",
                                           self.admission.retry_after_s))
                continue
            with self.admission.on_worker(worker.worker_id):
                call = self.channels.stub(worker.address).RunTurn(request, timeout=_remaining(deadline))
                try:
                    try:
                        first = await call.read()
                    except grpc.aio.AioRpcError as e:
                        if e.code() in _RETRYABLE and not _worker_gone(e):
                            log.info("worker %s refused a turn (%s); trying the next", worker.worker_id,
                                     e.code().name)
                            refusals.append(self._refused(worker, e))
                            continue
                        raise self._failed(worker, e) from None
                    self.directory.mark_ok(worker)
                    if first is grpc.aio.EOF:
                        return
                    yield first
                    while (event := await call.read()) is not grpc.aio.EOF:
                        yield event
                    return
                except grpc.aio.AioRpcError as e:
                    raise self._failed(worker, e) from None
                finally:
                    call.cancel()  # a no-op when the call has finished; stops the worker's turn otherwise
        raise _summary(refusals)

    def _failed(self, worker: WorkerLoad, e: grpc.aio.AioRpcError) -> ServeError:
        """The error of a call that failed after the worker took it (or, in transport, before it could say)."""
        if _worker_gone(e):
            self.directory.mark_failed(worker)
            return WorkerLost(f"lost worker {worker.worker_id} during the turn ({e.details()}); retry with the same "
                              "turn_id: a turn it committed before dying is answered from the commit, not run again",
                              worker_id=worker.worker_id)
        return _error(e)

    async def unary(self, method: str, request: Any, candidates: list[WorkerLoad],
                    deadline: float | None = None) -> Any:
        """A unary worker call (e.g. Tokenize) on the first candidate that answers."""
        if not candidates:
            raise Unavailable("no live worker serves this model")
        refusals: list[ServeError] = []
        for worker in candidates[: self.max_attempts]:
            try:
                return await getattr(self.channels.stub(worker.address), method)(request, timeout=_remaining(deadline))
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRYABLE:
                    raise _error(e) from None
                refusals.append(self._refused(worker, e))
        raise _summary(refusals)

    def _refused(self, worker: WorkerLoad, e: grpc.aio.AioRpcError) -> ServeError:
        error = _error(e)
        if e.code() == grpc.StatusCode.UNAVAILABLE and not isinstance(error, StoreUnavailable):
            self.directory.mark_failed(worker)  # (Redis being down is not this worker's fault)
        return error


def _summary(refusals: list[ServeError]) -> ServeError:
    """The error for "every candidate refused": overload (with the soonest retry) tells the client when to come
    back, so it wins over a dead worker's UNAVAILABLE."""
    overloaded = [e for e in refusals if isinstance(e, Overloaded)]
    if overloaded:
        return min(overloaded, key=lambda e: e.retry_after_s)
    return refusals[-1]
