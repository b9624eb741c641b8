"""The worker registry: each worker's record (common.worker_api.WorkerLoad) under a heartbeat TTL."""

from __future__ import annotations

import json
import logging

from common.store.base import StoreBase, store_errors
from common.worker_api import WorkerLoad

log = logging.getLogger(__name__)


@store_errors
class Registry(StoreBase):
    """Workers register (and heartbeat) themselves; fronts list the live ones."""

    async def register_worker(self, load: WorkerLoad, ttl_ms: int) -> None:
        """Writes (or refreshes: the heartbeat) a worker's registry record with a TTL."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(load.worker_id), json.dumps(load.to_record(), sort_keys=True), px=ttl_ms)
            pipe.sadd(self.keys.workers, load.worker_id)
            await pipe.execute()

    async def unregister_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.srem(self.keys.workers, worker_id)
            await pipe.execute()

    async def list_workers(self, model: str | None = None) -> list[WorkerLoad]:
        """Live workers (those whose heartbeat has not expired), optionally of one model, sorted by id. A record
        that does not parse (another program's key) is skipped with a warning, not fatal to routing."""
        ids = sorted(i.decode() for i in await self.redis.smembers(self.keys.workers))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.get(self.keys.worker(worker_id))
            raws = await pipe.execute()
        dead = [worker_id for worker_id, raw in zip(ids, raws) if raw is None]
        if dead:
            await self.redis.srem(self.keys.workers, *dead)
        live: list[WorkerLoad] = []
        for worker_id, raw in zip(ids, raws):
            if raw is None:
                continue
            try:
                live.append(WorkerLoad.from_record(json.loads(raw)))
            except ValueError as exc:
                log.warning("skipping the registry record of worker %s: %s", worker_id, exc)
        return [w for w in live if model is None or w.model.id == model]
