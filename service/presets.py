"""Preset states for the front: who may register and delete them, and the upload's path through a worker.

A preset is shared by every tenant of a model (sessions name it in CreateSession.preset), so registering and
deleting are for the tenants in FrontSettings.preset_admin_tenants (everyone in auth_mode dev); listing is for
everyone. The front loads no torch, so it cannot read a .pth: a worker serving the model checks the upload
(PrepareState: shapes, fingerprint) and returns it as a state record, which the front then stores. The worker
call stays free of side effects (any worker of the model can answer it, a retry elsewhere is safe), and storing,
replacing and the prefix-cache clean-up happen in one place, StateStore.put_preset, which the operators' CLI
(tuning/presets.py --redis-url) uses too.
"""

from __future__ import annotations

from collections.abc import Collection

from common.errors import (
    ForeignState,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    PresetExists,
    PresetNotFound,
)
from common.store import PresetInfo, StateStore, check_preset_name
from common.worker_api import PreparedState
from rwkv_serve.v1 import worker_pb2
from service.router import Router, WorkerDirectory

SOURCES = ("time_state_pth", "state_record")  # the RegisterPresetRequest.source fields
DESCRIPTION_MAX_BYTES = 1024


class Presets:
    """Register, list and delete a model's preset states on behalf of a tenant."""

    def __init__(self, store: StateStore, directory: WorkerDirectory, router: Router, *,
                 admins: Collection[str] | None, max_bytes: int) -> None:
        """`admins`: the tenants that may register and delete (None: every tenant, as in auth_mode dev);
        `max_bytes`: the largest upload."""
        self.store = store
        self.directory = directory
        self.router = router
        self.admins = None if admins is None else frozenset(admins)
        self.max_bytes = max_bytes

    def _check_admin(self, tenant: str, action: str) -> None:
        if self.admins is not None and tenant not in self.admins:
            raise PermissionDenied(f"tenant {tenant!r} may not {action} presets (presets are shared by every tenant "
                                   "of a model; the front's preset_admin_tenants may)")

    async def register(self, tenant: str, *, model: str, name: str, source: str, data: bytes,
                       description: str = "", replace: bool = False, deadline: float | None = None) -> PresetInfo:
        """Checks the upload on a worker of the model, then stores it; nothing is stored when any check fails."""
        self._check_admin(tenant, "register")
        if not model:
            raise InvalidArgument("model is required")
        check_preset_name(name)
        if len(description.encode("utf-8", "surrogatepass")) > DESCRIPTION_MAX_BYTES:
            raise InvalidArgument(f"a description is at most {DESCRIPTION_MAX_BYTES} bytes")
        if source not in SOURCES or not data:
            raise InvalidArgument("the state is required: time_state_pth or state_record")
        if len(data) > self.max_bytes:
            raise InvalidArgument(f"the upload is {len(data)} bytes; the limit is {self.max_bytes}")
        if not replace and await self.store.has_preset(model, name):  # fail early (put_preset checks atomically)
            raise PresetExists(f"preset {name!r} already exists for model {model!r}")
        candidates = await self.directory.least_loaded(model)
        if not candidates:
            raise ModelNotFound(f"model {model!r} is not served by any live worker (one must check the upload)")
        request = worker_pb2.PrepareStateRequest(model=model, **{source: data})
        prepared = PreparedState.from_pb(await self.router.unary("PrepareState", request, candidates, deadline))
        # Workers of one model id on different weights (a rollout half done): a preset stamped with one set would
        # be refused by the others at the session's first turn, so refuse it now.
        fingerprints = {w.model.fingerprint for w in candidates} - {""}
        if fingerprints - {prepared.fingerprint}:
            raise ForeignState(f"the workers of model {model!r} serve different weights (fingerprints "
                               f"{sorted(f[:12] for f in fingerprints)}); register the preset after the rollout")
        return await self.store.put_preset(model, name, prepared.record, description=description,
                                           tokens=prepared.tokens, replace=replace)

    async def list(self, model: str) -> list[PresetInfo]:
        if not model:
            raise InvalidArgument("model is required")
        return await self.store.describe_presets(model)

    async def delete(self, tenant: str, model: str, name: str) -> None:
        self._check_admin(tenant, "delete")
        if not model or not name:
            raise InvalidArgument("model and name are required")
        if not await self.store.delete_preset(model, name):
            raise PresetNotFound(f"no preset {name!r} for model {model!r}")
