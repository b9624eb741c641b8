"""The worker process: loads one model, runs the engine, serves WorkerService over grpc.aio, heartbeats to Redis.

`create_server(settings, core)` builds the gRPC server (WorkerService, health, reflection) on a bound port;
`serve(settings)` runs it until SIGTERM/SIGINT, then drains: health NOT_SERVING, leave the registry (the front
stops routing here), let running turns finish, stop the server with a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from common.lifecycle import add_health_and_reflection, bind, freeze_startup_heap, run_server, wait_for_stop_signal
from common.store import StateStore
from common.telemetry import Telemetry, configure_logging
from common.worker_api import ModelDescription, WorkerLoad
from rwkv_serve.v1 import worker_pb2, worker_pb2_grpc
from worker.constraints import ConstraintLimits
from worker.engine import Engine
from worker.model import RWKV5
from worker.runner import RunnerConfig, TurnRunner
from worker.servicer import WorkerServicer
from worker.settings import WorkerSettings
from worker.state_cache import StateCache
from worker.tokenizer import load_tokenizer

log = logging.getLogger("rwkv.worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(settings: WorkerSettings) -> tuple[RWKV5, str, bool]:
    """The model, its id, and whether it is a random-init one (no model_path given)."""
    path, random_init = settings.model_path, settings.model_path is None
    if path is None:
        from worker.checkpoint import make_random_checkpoint

        directory = settings.random_dir or Path(tempfile.gettempdir()) / "rwkv-serve"
        path = directory / f"rwkv5-random-L{settings.random_n_layer}-D{settings.random_n_embd}.pth"
        if not path.exists():
            make_random_checkpoint(path, n_layer=settings.random_n_layer, n_embd=settings.random_n_embd, seed=0)
        log.warning("no model given: serving a RANDOM-INIT RWKV-5 model (%s); its output is gibberish", path)
    model = RWKV5.from_checkpoint(path, device=settings.device, dtype=_DTYPES[settings.dtype],
                                  kernel=settings.cpu_kernel)
    log.info("model %s: %s on %s, matmul kernel %s", path, settings.dtype, settings.device, model.kernel)
    model_id = settings.model_id or ("rwkv5-random" if random_init else Path(path).stem)
    return model, model_id, random_init


def constraint_limits(settings: WorkerSettings) -> ConstraintLimits:
    """The response_format limits of worker/constraints.py, from the RWKV_WORKER_CONSTRAINT_* settings."""
    return ConstraintLimits(
        max_bytes=settings.constraint_max_bytes, lexer_fuel=settings.constraint_lexer_fuel,
        step_fuel=settings.constraint_step_fuel, max_grammar_size=settings.constraint_max_grammar_size,
        cache_size=settings.constraint_cache_size, threads=settings.constraint_threads or None)


class WorkerCore:
    """The worker's parts (model, engine, store, runner) and its state (serving or draining), without gRPC."""

    def __init__(
        self, settings: WorkerSettings, model: RWKV5, tokenizer, model_id: str, random_init: bool = False,
        store: StateStore | None = None, telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.model = model
        self.tokenizer = tokenizer
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.store = store or settings.open_store()
        self.engine = Engine(
            model, tokenizer, max_batch=settings.max_batch, max_queued=settings.max_queued,
            prefill_chunk=settings.prefill_chunk, prefill_token_budget=settings.prefill_token_budget,
            max_tokens_limit=settings.max_tokens_limit, constraint_limits=constraint_limits(settings),
            prefill_cost_slack=settings.prefill_cost_slack if settings.prefill_pacing else None,
            prefill_burst_streams=settings.prefill_burst_streams, prefill_gather_ms=settings.prefill_gather_ms,
        )
        self.cache = StateCache(settings.cache_bytes)
        self.engine.on_decode = self.telemetry.batch_size.record
        self._trace = None
        if settings.step_trace is not None:
            self._trace = open(settings.step_trace, "a", buffering=1)  # noqa: SIM115 - closed in close()
            self.engine.on_step = lambda record: self._trace.write(json.dumps(asdict(record)) + "\n")
        self.telemetry.observe_engine(lambda: self.engine.load, self.cache)
        self.runner = TurnRunner(
            self.engine, self.store, tokenizer,
            RunnerConfig.from_settings(settings, model_id, self.worker_id),
            self.cache, self.telemetry,
        )
        cfg = model.config
        self.description = ModelDescription(
            id=model_id, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
            state_bytes=cfg.state_bytes, fingerprint=model.fingerprint.hex(), random_init=random_init,
            head_size=cfg.head_size,
        )
        self.health = health_aio.HealthServicer()
        self.address = ""
        self.serving = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._warm: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: WorkerSettings, telemetry: Telemetry | None = None) -> WorkerCore:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model, model_id, random_init = load_model(settings)
        return cls(settings, model, load_tokenizer(settings.vocab_path), model_id, random_init, telemetry=telemetry)

    def load(self) -> WorkerLoad:
        engine = self.engine.load
        return WorkerLoad(self.worker_id, self.address, self.description, engine.capacity, engine.active,
                          engine.queued, engine.max_queued, self.serving)

    async def start(self) -> None:
        """Starts the engine, marks the worker serving and starts heartbeating into the registry."""
        presets = await self.store.list_presets(self.description.id)
        self.description = replace(self.description, presets=tuple(presets))
        self.engine.start()
        # The response_format compiler's vocabulary (~0.5 s for World's 65k tokens) is built off the event loop now,
        # rather than by the first turn that asks for a constraint.
        self._warm = asyncio.create_task(self._warm_constraints(), name="rwkv-constraints")
        self.serving = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._beat()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="rwkv-heartbeat")

    async def _warm_constraints(self) -> None:
        try:
            await asyncio.to_thread(lambda: self.engine.constraints)
        except Exception:  # a turn with a response_format will raise it again, to its caller
            log.warning("could not build the response_format compiler", exc_info=True)

    async def _beat(self) -> None:
        await self.store.register_worker(self.load(), self.settings.registry_ttl_ms)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self._beat()
            except Exception:  # Redis hiccup: the next beat retries; the record's TTL covers a few misses
                log.warning("heartbeat to Redis failed", exc_info=True)

    async def begin_drain(self) -> None:
        """Stops taking turns: health NOT_SERVING and out of the registry; running turns go on."""
        self.serving = False
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        try:
            await self.store.unregister_worker(self.worker_id)
        except Exception:
            log.warning("could not leave the registry; the record expires on its own", exc_info=True)

    async def close(self) -> None:
        await self.engine.close()
        await self.store.close()
        if self._trace is not None:
            self._trace.close()


def create_server(settings: WorkerSettings, core: WorkerCore) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with WorkerService, health and reflection, bound to settings.host:settings.port."""
    # Turns are small messages; PrepareState carries a whole preset upload (41 MiB for the 12B model), and this
    # limit (plus room for the request's other fields) is what lets it in.
    receive_bytes = settings.max_preset_mb * 1024 * 1024 + (1 << 20)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", receive_bytes),
                                      ("grpc.max_send_message_length", receive_bytes)],
                             interceptors=core.telemetry.server_interceptors() or None)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(core.runner, core.load), server)
    add_health_and_reflection(server, SERVICE_NAME, core.health)
    port = bind(server, settings.host, settings.port, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
                tls_client_ca=settings.tls_client_ca)
    core.address = f"{settings.advertise_host or settings.host}:{port}"
    return server, port


async def shutdown(server: grpc.aio.Server, core: WorkerCore, settings: WorkerSettings) -> None:
    """Drains (no new turns, running ones finish within drain_s), then stops the server and the engine."""
    await core.begin_drain()
    if not await core.engine.drain(settings.drain_s):
        log.warning("turns still running after %.0fs of draining; cancelling them", settings.drain_s)
    await server.stop(settings.grace_s)
    await core.close()


async def serve(settings: WorkerSettings) -> None:
    """Runs a worker until SIGTERM or SIGINT."""
    telemetry = Telemetry.from_settings(settings, "rwkv-worker", settings.worker_id)
    core = await asyncio.to_thread(WorkerCore.from_settings, settings, telemetry)
    server, port = create_server(settings, core)
    await core.store.verify()  # a wrong Redis password stops the start with a clear message
    await server.start()
    await core.start()
    freeze_startup_heap()
    log.info("worker %s serving %s on %s (batch %d, %s)", core.worker_id, core.description.id, core.address,
             settings.max_batch, "plaintext" if settings.tls_cert is None
             else "mutual TLS" if settings.tls_client_ca else "TLS")
    await wait_for_stop_signal()
    log.info("worker %s draining", core.worker_id)
    await shutdown(server, core, settings)
    telemetry.shutdown()


def main(argv: list[str] | None = None) -> None:
    """`rwkv-worker`: flags override RWKV_WORKER_* environment variables."""
    parser = argparse.ArgumentParser(prog="rwkv-worker", description="Serve one RWKV-5 model as an rwkv-serve worker.")
    parser.add_argument("--model", dest="model_path", type=Path, help="RWKV-5 .pth (default: a random-init model)")
    parser.add_argument("--model-id", help="model id clients use (default: the file name)")
    parser.add_argument("--vocab", dest="vocab_path", type=Path, help="vocab .txt or tokenizer .json")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(_DTYPES))
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--advertise-host")
    parser.add_argument("--redis-url")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--worker-id")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = WorkerSettings(**overrides)
    configure_logging("INFO", settings.log_format)
    run_server(serve(settings), parser)


if __name__ == "__main__":
    main()
