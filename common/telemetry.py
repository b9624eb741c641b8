"""OpenTelemetry for the front and the worker: providers built from settings in main(), the serving metrics,
trace context in gRPC metadata, and structured logs that carry session and trace ids.

Nothing happens at import: `Telemetry.from_settings(...)` (called by main()) builds the providers and exporters;
`Telemetry()` is the no-op default every object falls back to; tests pass in-memory providers.

Traces: the gRPC server interceptor makes an rpc span per call from the caller's W3C `traceparent`; the front
adds a `route` span per turn and sends its context to the worker in the call's metadata; the worker's `turn`
span holds `state.load`, `state.commit` and the engine's `queue`, `prefill` and `decode` phases. The engine
runs in its own thread, outside any trace context, so it only records timestamps (worker.engine.TurnTimings)
and the runner turns them into spans with those start and end times.

Metrics (histograms in seconds unless noted):
  rwkv.turn.time_to_first_token   turn received by the worker -> first token out (lease, state, queue, prefill)
  rwkv.turn.inter_token_latency   between consecutive tokens of a turn
  rwkv.turn.duration              end-to-end on the worker, by stop reason
  rwkv.turn.queue_time / rwkv.turn.prefill_time   waiting for a batch slot / feeding the input
  rwkv.turns.running / rwkv.turns.waiting         gauges: turns in the batch / in the engine's queue
  rwkv.engine.batch_size          turns decoded together per step
  rwkv.tokens.prompt / rwkv.tokens.generated      counters
  rwkv.state.size (bytes), rwkv.state.load.duration, rwkv.state.commit.duration
  rwkv.state_cache.hits / rwkv.state_cache.misses  the worker's local state cache
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import Observation
from pydantic import Field
from pydantic_settings import BaseSettings

log = logging.getLogger(__name__)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES = tuple(float(1 << n) for n in range(16, 28))  # 64 KiB .. 128 MiB: the state sizes of 0.1B .. 14B models

# The session a log record is about; set where a call resolves its session (front and worker).
session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("rwkv_session_id", default="")


class ObservabilitySettings(BaseSettings):
    """Telemetry and logging fields shared by the front's and the worker's settings (each with its env prefix)."""

    traces_exporter: Literal["none", "console", "otlp"] = "none"
    metrics_exporter: Literal["none", "console", "otlp", "prometheus"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"  # an OTLP/gRPC collector
    otlp_insecure: bool = True  # plaintext to the collector (usually a local agent)
    metrics_interval_s: float = Field(10.0, gt=0)  # console/OTLP export period
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = Field(9464, ge=0)  # GET /metrics; 0 = any free port (logged)
    trace_redis: bool = False  # a span per Redis command (instruments the redis client of this process)
    log_format: Literal["text", "json"] = "text"
    log_text: bool = False  # DEBUG logs of prompt and reply text; never on by default (they are user data)


class Telemetry:
    """A process's tracer and meter, and the instruments of the serving metrics (no-ops unless given providers)."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, *, log_text: bool = False) -> None:
        self.tracing = tracer_provider is not None
        self.tracer_provider = tracer_provider or trace.NoOpTracerProvider()
        self.meter_provider = meter_provider or metrics.NoOpMeterProvider()
        self.tracer = self.tracer_provider.get_tracer("rwkv_serve")
        self.log_text = log_text
        self.prometheus_port = 0  # where GET /metrics answers, when that exporter is on
        self._closers: list[Callable[[], Any]] = []
        m = self.meter = self.meter_provider.get_meter("rwkv_serve")

        def seconds(name: str, description: str) -> Any:
            return m.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=SECONDS)

        self.ttft = seconds("rwkv.turn.time_to_first_token", "Turn received by the worker to its first token")
        self.itl = seconds("rwkv.turn.inter_token_latency", "Time between consecutive tokens of a turn")
        self.duration = seconds("rwkv.turn.duration", "End-to-end time of a turn on the worker")
        self.queue_time = seconds("rwkv.turn.queue_time", "Time a turn waited for a batch slot")
        self.prefill_time = seconds("rwkv.turn.prefill_time", "Time to feed a turn's input (chunked prefill)")
        self.state_load = seconds("rwkv.state.load.duration", "Getting a session's state (cache, Redis or prefix)")
        self.state_commit = seconds("rwkv.state.commit.duration", "Serializing and committing a session's state")
        self.batch_size = m.create_histogram("rwkv.engine.batch_size", unit="{turn}",
                                             description="Turns decoded together in one engine step",
                                             explicit_bucket_boundaries_advisory=BATCH)
        self.state_size = m.create_histogram("rwkv.state.size", unit="By", description="Bytes of a committed state",
                                             explicit_bucket_boundaries_advisory=BYTES)
        self.prompt_tokens = m.create_counter("rwkv.tokens.prompt", unit="{token}", description="Input tokens fed")
        self.generated_tokens = m.create_counter("rwkv.tokens.generated", unit="{token}",
                                                 description="Tokens sampled")

    @classmethod
    def from_settings(cls, settings: ObservabilitySettings, service_name: str, instance_id: str = "") -> Telemetry:
        """Providers and exporters as configured (none by default); called once, in main()."""
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create({"service.name": service_name,
                                    **({"service.instance.id": instance_id} if instance_id else {})})
        closers: list[Callable[[], Any]] = []
        tracer_provider = None
        if settings.traces_exporter != "none":
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            if settings.traces_exporter == "console":
                span_exporter: Any = ConsoleSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                span_exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure)
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            closers.append(tracer_provider.shutdown)
        meter_provider = None
        prometheus_port = 0
        if settings.metrics_exporter != "none":
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

            period_ms = settings.metrics_interval_s * 1000
            if settings.metrics_exporter == "prometheus":
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import start_http_server

                reader: Any = PrometheusMetricReader()
                server, _ = start_http_server(settings.prometheus_port, settings.prometheus_host)
                closers.append(server.shutdown)
                prometheus_port = server.server_port
                log.info("Prometheus metrics on http://%s:%d/metrics", settings.prometheus_host, prometheus_port)
            elif settings.metrics_exporter == "console":
                reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=period_ms)
            else:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

                reader = PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure),
                    export_interval_millis=period_ms)
            meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            closers.insert(0, meter_provider.shutdown)
        if settings.trace_redis and tracer_provider is not None:
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor().instrument(tracer_provider=tracer_provider)
            closers.insert(0, RedisInstrumentor().uninstrument)
        telemetry = cls(tracer_provider, meter_provider, log_text=settings.log_text)
        telemetry._closers = closers
        telemetry.prometheus_port = prometheus_port
        return telemetry

    def shutdown(self) -> None:
        """Flushes and stops the exporters."""
        for close in self._closers:
            try:
                close()
            except Exception:  # telemetry must never stop a shutdown
                log.warning("telemetry shutdown step failed", exc_info=True)
        self._closers = []

    # ---- gRPC ----------------------------------------------------------------------------------------------

    def server_interceptors(self) -> list[Any]:
        """Interceptors of a grpc.aio server: an rpc span per call, continuing the caller's trace (health
        checks excluded); none when tracing is off."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [aio_server_interceptor(tracer_provider=self.tracer_provider,
                                       filter_=filters.negate(filters.health_check()))]

    def client_interceptors(self) -> list[Any]:
        """Interceptors of the front's channels to the workers: they carry the trace context (see send_context);
        none when tracing is off."""
        return [_UnaryTraceContext(), _StreamTraceContext()] if self.tracing else []

    # ---- spans ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, histogram: Any = None, **attributes: Any) -> Iterator[Any]:
        """A span that is current inside the block (use it only where the block runs in one task); the block's
        duration also goes to `histogram`; a ServeError marks the span failed with its message."""
        start = time.perf_counter()
        with self.tracer.start_as_current_span(name, attributes=_attrs(attributes), record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                yield span
            except Exception as exc:
                failed(span, exc)
                raise
            finally:
                if histogram is not None:
                    histogram.record(time.perf_counter() - start)

    @contextlib.contextmanager
    def turn_span(self, **attributes: Any) -> Iterator[TurnWatch]:
        """The worker's `turn` span, current while the turn runs (its generator is driven by one task: the
        RPC's), and the watch that times the turn's events."""
        with self.span("turn", **attributes):
            yield TurnWatch(self)

    def phase_spans(self, timings: Any, decoded: bool = True, **attributes: Any) -> None:
        """The engine's queue/prefill/decode spans of one turn (worker.engine.TurnTimings), under the current
        span, with the times the engine recorded; and the queue and prefill histograms. `decoded`: the turn
        sampled tokens (a prefill-only pass has no decode phase)."""
        if timings is None or not timings.submitted_ns:
            return
        attrs = _attrs(attributes)
        end = timings.finished_ns
        admitted = timings.admitted_ns or end
        self._interval("queue", timings.submitted_ns, admitted, attrs)
        self.queue_time.record((admitted - timings.submitted_ns) / 1e9)
        if timings.admitted_ns:
            prefilled = timings.prefilled_ns or end
            self._interval("prefill", timings.admitted_ns, prefilled, attrs)
            self.prefill_time.record((prefilled - timings.admitted_ns) / 1e9)
            if decoded and timings.prefilled_ns and end > timings.prefilled_ns:
                self._interval("decode", timings.prefilled_ns, end, attrs)

    def _interval(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
        span = self.tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))

    # ---- metrics -------------------------------------------------------------------------------------------

    def observe_engine(self, load: Callable[[], Any], cache: Any) -> None:
        """Gauges of the engine's running and waiting turns and counters of the state cache, read on collection."""
        self.meter.create_observable_gauge(
            "rwkv.turns.running", callbacks=[lambda _o: [Observation(load().active)]], unit="{turn}",
            description="Turns in the running batch")
        self.meter.create_observable_gauge(
            "rwkv.turns.waiting", callbacks=[lambda _o: [Observation(load().queued)]], unit="{turn}",
            description="Turns waiting for a batch slot")
        self.meter.create_observable_counter(
            "rwkv.state_cache.hits", callbacks=[lambda _o: [Observation(cache.hits)]], unit="{lookup}",
            description="Session states found in the worker's local cache at the stored version")
        self.meter.create_observable_counter(
            "rwkv.state_cache.misses", callbacks=[lambda _o: [Observation(cache.misses)]], unit="{lookup}",
            description="Session states not in the local cache (read from Redis or built)")


class TurnWatch:
    """Times one turn's events on the worker: first token, gaps between tokens, end-to-end, token counts."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry
        self.start = time.perf_counter()
        self.last: float | None = None
        self.text: list[str] | None = [] if telemetry.log_text else None  # kept only for the debug log

    def delta(self, tokens: int, text: str) -> None:
        if self.text is not None:
            self.text.append(text)
        if not tokens:
            return
        now = time.perf_counter()
        if self.last is None:
            self.t.ttft.record(now - self.start)
        else:
            self.t.itl.record((now - self.last) / tokens)
        self.last = now

    def ended(self, prompt_tokens: int, generated_tokens: int, stop_reason: str) -> None:
        self.t.duration.record(time.perf_counter() - self.start, {"stop_reason": stop_reason})
        self.t.prompt_tokens.add(prompt_tokens)
        self.t.generated_tokens.add(generated_tokens)


def failed(span: Any, exc: BaseException) -> None:
    """Marks a span failed with the error's class and message (domain messages carry no user text)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", type(exc).__name__)


# The trace context that worker calls made from the current task carry (the front's route span). A contextvar
# and not the OTel "current span": the front relays a turn from several short-lived tasks, and an attached
# OTel context must be detached in the task that attached it.
_outgoing: contextvars.ContextVar[otel_context.Context | None] = contextvars.ContextVar("rwkv_outgoing", default=None)


def send_context(ctx: otel_context.Context | None) -> None:
    """Worker calls started from this task (and tasks it starts) from now on carry `ctx`'s trace context."""
    _outgoing.set(ctx)


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The call's details with the W3C trace context (send_context's, else the current one) in its metadata."""
    carried = inject_metadata(_outgoing.get())
    if not carried:
        return details
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *carried)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# One class per call kind: grpc.aio files an interceptor under the first kind it implements only.
class _UnaryTraceContext(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _StreamTraceContext(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


def inject_metadata(ctx: otel_context.Context | None = None) -> tuple[tuple[str, str], ...]:
    """The W3C trace context (traceparent, tracestate) of `ctx` (default: the current one) as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items())


def _attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    return {f"rwkv.{k}": v for k, v in attributes.items() if v not in (None, "")}


# ---- logs --------------------------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Adds session_id, trace_id and span_id (from the current context) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = getattr(record, "session_id", "") or session_id_var.get()
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else ""
        record.span_id = f"{ctx.span_id:016x}" if ctx.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session and trace ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("session_id", "trace_id", "span_id"):
            if getattr(record, key, ""):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={getattr(record, k)}" for k in ("session_id", "trace_id") if getattr(record, k, ""))
        return f"{line} [{ids}]" if ids else line


def configure_logging(level: str | int = "INFO", fmt: str = "text", stream: Any = None) -> logging.Handler:
    """The process's root handler (called from main()): text or JSON lines, with session and trace ids."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def set_session(session_id: str) -> None:
    """Names the session the current task's log records are about."""
    session_id_var.set(session_id)
