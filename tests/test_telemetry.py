"""Observability: traces from the SDK client through the front and the worker down to the state store, the
serving metrics, structured logs with session and trace ids, and logs that hold no secrets or prompt text.

A real front and a real worker (tiny model) run in this process on loopback ports, against the test Redis, with
in-memory span and metric exporters."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.telemetry import ContextFilter, JsonFormatter, Telemetry, set_session
from rwkv_serve_client import AsyncRWKVClient
from service.front import Front
from service.server import create_server as create_front
from service.settings import FrontSettings
from tests.e2e_fixtures import key_entry
from worker.server import WorkerCore, shutdown
from worker.server import create_server as create_worker
from worker.settings import WorkerSettings

API_KEY = "rwkv_key-that-must-never-be-logged-42"
PROMPT = "zebra-quartz-lighthouse"  # a prompt no log line may contain (unless log_text is on)


@dataclass
class Stack:
    """An in-process front + worker, the client's tracer provider, and what the exporters collected."""

    target: str
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    worker: WorkerCore




@pytest.fixture
async def stack(redis_url, store, tiny_model, tokenizer, request) -> AsyncIterator[Stack]:
    log_text = getattr(request, "param", False)
    torch.set_num_threads(1)
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    worker_telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[metrics]), log_text=log_text)
    worker_settings = WorkerSettings(redis_url=redis_url, port=0, model_id="tiny", max_batch=4, heartbeat_s=0.2,
                                     drain_s=1, grace_s=0.2)
    core = WorkerCore(worker_settings, tiny_model, tokenizer, "tiny", telemetry=worker_telemetry)
    worker_server, _ = create_worker(worker_settings, core)
    await worker_server.start()
    await core.start()
    front_settings = FrontSettings(host="127.0.0.1", port=0, redis_url=redis_url, discovery_interval_s=0.0,
                                   auth_mode="keys", api_key_hashes=[key_entry("acme", API_KEY)])
    front, port = create_front(front_settings, Front.from_settings(front_settings, Telemetry(tracer_provider)))
    await front.start()
    try:
        yield Stack(f"127.0.0.1:{port}", spans, metrics, tracer_provider, core)
    finally:
        await front.stop(0)
        await shutdown(worker_server, core, worker_settings)
        tracer_provider.shutdown()


async def _two_turns(stack: Stack) -> str:
    """Inside a client span: a session with a system prompt, then two greedy turns of 4 tokens."""
    tracer = stack.tracer_provider.get_tracer("test")
    async with AsyncRWKVClient(stack.target, api_key=API_KEY, tracer_provider=stack.tracer_provider,
                               timeout=60) as rwkv:
        with tracer.start_as_current_span("user-request"):
            session = await rwkv.create_session("tiny", system_prompt="You are terse.", temperature=0,
                                                max_tokens=4, stop_token_ids=[])
            first = await rwkv.say(session.session_id, PROMPT)
            second = await rwkv.say(session.session_id, "and then?")
    assert first.usage.generated_tokens == second.usage.generated_tokens == 4
    assert second.state_version == 2
    return session.session_id


def _by_name(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


async def test_one_trace_from_client_to_state_commit(stack: Stack) -> None:
    session_id = await _two_turns(stack)
    spans = stack.spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    root = _by_name(spans, "user-request")[0]
    trace_id = root.context.trace_id

    def parent(span: Any) -> Any:
        return by_id[span.parent.span_id] if span.parent is not None and span.parent.span_id in by_id else None

    def ancestors(span: Any) -> list[str]:
        out = []
        while (span := parent(span)) is not None:
            out.append(span.name)
        return out

    front_chat = [s for s in _by_name(spans, "/rwkv_serve.v1.RwkvService/Chat") if s.kind is trace.SpanKind.SERVER]
    routes = _by_name(spans, "route")
    worker_rpcs = [s for s in _by_name(spans, "/rwkv_serve.v1.WorkerService/RunTurn")
                   if s.kind is trace.SpanKind.SERVER]
    turns = _by_name(spans, "turn")
    assert len(front_chat) == len(routes) == len(worker_rpcs) == len(turns) == 2
    for span in [*front_chat, *routes, *worker_rpcs, *turns]:
        assert span.context.trace_id == trace_id  # one trace end to end: client -> front -> worker
    for chat, route, rpc, turn in zip(front_chat, routes, worker_rpcs, turns):
        assert parent(route) is chat  # the front's rpc span -> route
        assert parent(rpc) is route  # ... -> the worker's rpc span (context carried in the call's metadata)
        assert parent(turn) is rpc
        assert "user-request" in ancestors(chat)  # the SDK's client span sent its traceparent
        assert route.attributes["rwkv.session_id"] == turn.attributes["rwkv.session_id"] == session_id
        assert route.attributes["rwkv.worker_id"] == stack.worker.worker_id
        children = {s.name: s for s in spans if parent(s) is turn}
        assert {"state.load", "queue", "prefill", "decode", "state.commit"} <= set(children)
        queue, prefill, decode = children["queue"], children["prefill"], children["decode"]
        # The engine thread's phases, laid end to end inside the turn.
        assert turn.start_time <= queue.start_time <= queue.end_time <= prefill.start_time
        assert prefill.end_time <= decode.start_time <= decode.end_time <= turn.end_time
        assert children["state.commit"].start_time >= decode.end_time - 1_000_000
        assert children["state.commit"].attributes["rwkv.state_bytes"] > 0
    # The system prompt's state is built once, by a prefill-only engine pass inside the first turn's state.load.
    first_load = [s for s in spans if s.name == "state.load" and parent(s) is turns[0]][0]
    assert [s.name for s in spans if parent(s) is first_load] == ["queue", "prefill"]
    assert not any(s.name == "prefill" and parent(s) is not None and parent(s).name == "state.load"
                   and parent(parent(s)) is turns[1] for s in spans)  # the second turn reads the committed state


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


async def test_serving_metrics(stack: Stack) -> None:
    await _two_turns(stack)
    points = _points(stack.metrics)
    expected = {"rwkv.turn.time_to_first_token", "rwkv.turn.inter_token_latency", "rwkv.turn.duration",
                "rwkv.turn.queue_time", "rwkv.turn.prefill_time", "rwkv.turns.running", "rwkv.turns.waiting",
                "rwkv.engine.batch_size", "rwkv.tokens.prompt", "rwkv.tokens.generated", "rwkv.state.size",
                "rwkv.state.load.duration", "rwkv.state.commit.duration", "rwkv.state_cache.hits",
                "rwkv.state_cache.misses"}
    assert expected <= set(points), expected - set(points)

    def histogram(name: str) -> tuple[int, float, float, float]:
        (p,) = points[name] if len(points[name]) == 1 else [max(points[name], key=lambda x: x.count)]
        return p.count, p.sum, p.min, p.max

    def total(name: str) -> float:
        return sum(p.value for p in points[name])

    count, _, low, high = histogram("rwkv.turn.time_to_first_token")
    assert count == 2 and 0 < low <= high < 30
    count, _, low, high = histogram("rwkv.turn.inter_token_latency")
    assert count == 6 and 0 < low <= high < 30  # 3 gaps per 4-token turn
    assert sum(p.count for p in points["rwkv.turn.duration"]) == 2
    assert {p.attributes["stop_reason"] for p in points["rwkv.turn.duration"]} == {"max_tokens"}
    assert histogram("rwkv.turn.queue_time")[0] == 3  # two turns and the system prompt's prefill
    assert total("rwkv.tokens.generated") == 8
    assert total("rwkv.tokens.prompt") > 8
    count, _, low, high = histogram("rwkv.engine.batch_size")
    assert count >= 6 and low >= 1 and high <= 4
    count, total_bytes, low, _ = histogram("rwkv.state.size")
    assert count == 2 and low > stack.worker.model.config.state_bytes  # the record: the tensors plus a header
    assert histogram("rwkv.state.load.duration")[0] == histogram("rwkv.state.commit.duration")[0] == 2
    assert total("rwkv.state_cache.hits") == 1 and total("rwkv.state_cache.misses") == 1  # turn 2 hit the cache
    assert total("rwkv.turns.running") == total("rwkv.turns.waiting") == 0  # all done


def test_json_logs_carry_session_and_trace_ids() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rwkv.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    provider = TracerProvider()
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            set_session("sess-123")
            logger.warning("inside %s", "a span")
        set_session("")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["msg"] == "inside a span" and inside["level"] == "WARNING" and inside["session_id"] == "sess-123"
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert "trace_id" not in outside and "session_id" not in outside


@pytest.mark.parametrize("stack", [False, True], indirect=True, ids=["default", "log_text"])
async def test_logs_hold_no_key_and_no_prompt_by_default(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await _two_turns(stack)
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert API_KEY not in text  # never, in any mode
    log_text = stack.worker.telemetry.log_text
    assert (PROMPT in text) is log_text  # prompt text only with the explicit debug setting
    assert caplog.records  # (DEBUG logging was captured: the assertion above could fail)


def test_exporters_are_chosen_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    printed = io.StringIO()  # the console exporter's stream (its default, sys.stdout, is bound at import)
    console_init = ConsoleSpanExporter.__init__
    monkeypatch.setattr(ConsoleSpanExporter, "__init__", lambda self, **kw: console_init(self, **kw, out=printed))
    off = Telemetry.from_settings(WorkerSettings(), "rwkv-worker")
    assert not off.tracing and off.server_interceptors() == [] and off.client_interceptors() == []
    on = Telemetry.from_settings(WorkerSettings(traces_exporter="console", metrics_exporter="prometheus",
                                                prometheus_host="127.0.0.1", prometheus_port=0), "rwkv-worker", "w7")
    try:
        assert on.tracing and on.prometheus_port > 0
        with on.span("state.load", on.state_load, session_id="s1"):
            pass
        on.ttft.record(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{on.prometheus_port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "rwkv_turn_time_to_first_token_seconds_bucket" in body
        assert "rwkv_state_load_duration_seconds_count" in body
    finally:
        on.shutdown()
    out = printed.getvalue()  # the console exporter printed the span (flushed at shutdown)
    assert '"name": "state.load"' in out and '"rwkv.session_id": "s1"' in out and '"w7"' in out
