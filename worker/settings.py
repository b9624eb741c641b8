"""The worker process's settings (environment variables prefixed RWKV_WORKER_, or constructed directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.store import RedisSettings
from common.telemetry import ObservabilitySettings


class WorkerSettings(ObservabilitySettings, RedisSettings):
    """Everything a worker needs; built once in main() and passed down (tests construct it directly)."""

    model_config = SettingsConfigDict(env_prefix="RWKV_WORKER_", extra="ignore")

    # The model. No path: a random-init checkpoint (it produces gibberish; the worker says so).
    model_path: Path | None = None
    model_id: str = ""  # '' = the checkpoint's file stem, or "rwkv5-random" for the random model
    vocab_path: Path | None = None  # World vocab .txt or HF tokenizer .json; None = the standard World vocab
    device: str = "cpu"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # CPU matmul: the native AVX2 kernels (built on first use, ~20 s), oneDNN, both ("dual": native for small
    # batches, oneDNN from 8 rows in bf16 / 32 in fp32; twice the weight memory), or plain torch. auto = dual on
    # CPUs where oneDNN's large GEMMs are faster (AVX512_BF16/AMX for bf16, AVX-512 for fp32), else the first that
    # works here (see worker.linear.Linear); pin native or onednn to hold one copy of the weights.
    cpu_kernel: Literal["auto", "native", "onednn", "dual", "torch"] = "auto"
    random_n_layer: int = 2  # shape of the random-init model
    random_n_embd: int = 128
    random_dir: Path | None = None  # where the random checkpoint is written (None = a temporary directory)
    torch_threads: int | None = None  # intra-op threads; None = torch's default

    # Network. port 0 = an ephemeral port; advertise_host is what goes into the registry for the front to dial.
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    worker_id: str = ""  # '' = generated (host-pid-random)

    # TLS on the worker's port (PEM files); tls_client_ca also requires the front to present a client certificate
    # signed by that CA (mutual TLS: only fronts holding such a certificate can run turns here).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    # Redis: the connection fields come from RedisSettings (RWKV_WORKER_REDIS_URL, ..._REDIS_PREFIX, ...).
    heartbeat_s: float = Field(2.0, gt=0)
    registry_ttl_ms: int = Field(6_000, gt=0)  # a worker that stops heartbeating vanishes after this
    # A turn's session lease, renewed every third of it while the turn runs. The front breaks the lease of a
    # worker it saw die; otherwise (e.g. the front died too) this TTL is how long that session stays busy.
    lease_ms: int = Field(10_000, gt=0)
    prefix_ttl_ms: int = Field(86_400_000, gt=0)  # a prefix-cache entry unused this long expires
    # The shared prefix-state cache (worker/prefix_cache.py): states at message boundaries of stateless
    # conversations and at new sessions' system prompts, in Redis. Its total size per model is bounded (least
    # recently used entries go first); false = neither looked up nor stored (the same segments are prefilled).
    prefix_cache: bool = True
    prefix_cache_max_bytes: int = Field(2 << 30, ge=0)
    max_messages: int = Field(256, ge=1)  # messages in one turn's input; more is INVALID_ARGUMENT
    max_choices: int = Field(16, ge=1)  # n of one request (choices sampled from one prefilled prompt)
    # How long a committed turn's result stays in Redis (one record per session, its latest turn), so that a retry
    # with the same turn_id after a worker died between its commit and its turn_end is answered from it instead of
    # running again (common/store/turns.py).
    turn_result_ttl_ms: int = Field(3_600_000, gt=0)
    # TEST ONLY (fault injection): "exit" makes the worker os._exit(1) right after a turn's commit, before its
    # turn_end is sent, the one moment a timed SIGKILL cannot hit (tests/test_exactly_once.py). Never set it in a
    # deployment.
    fault_after_commit: Literal["", "exit"] = ""

    # Engine.
    max_batch: int = Field(16, ge=1)
    max_queued: int = Field(64, ge=0)
    prefill_chunk: int = Field(256, ge=1)
    # Prefill tokens per engine step while a decode lane runs: the waiting turns' chunks, grouped by length, each
    # group one batched forward. It bounds what a prefill adds to the running streams' inter-token latency (128:
    # chosen by bench/bench_prefill.py, see docs/benchmarks.md); a step with no stream decoding takes every
    # waiting chunk. 0 = the old behaviour, one turn's chunk per step (a first token waits for every turn
    # admitted before it).
    prefill_token_budget: int = Field(128, ge=0)
    # Prefill pacing (worker/engine/pacing.py), beside a decode lane: the first waiting turn's chunk always runs (as
    # with budget 0); the chunks after it join only while their measured cost (each step's parts are timed) adds at
    # most prefill_cost_slack x that step (the lane plus the first chunk), so the streams' inter-token latency stays
    # within (1 + slack) x the one-chunk step's; a lane of at most slack x as many streams as waiting turns (a burst)
    # does not hold them back, nor does one within the burst credit (a burst whose turns arrive over several steps):
    # prefill_burst_streams is its cap, the largest lane such a step may hold back (None: max_batch // 4; 0: off).
    # false = the token budget alone. See docs/benchmarks.md.
    prefill_pacing: bool = True
    prefill_cost_slack: float = Field(0.1, ge=0)
    prefill_burst_streams: int | None = Field(None, ge=0)
    # With pacing: a burst still arriving (two or more fresh turns less than this apart on average, the last less than
    # this ago) is held back, the lane decoding alone meanwhile, for at most what its prefill is predicted to cost,
    # so that it is prefilled in one step (worker/engine/pacing.py: gathering a burst). 0 = off.
    prefill_gather_ms: float = Field(5.0, ge=0)
    # A JSON line per engine step appended to this file (start, seconds, lane rows, prefill tokens and turns, the
    # submit times of the turns that started prefill): for benchmarks and diagnosis (bench/bench_front_prefill.py).
    step_trace: Path | None = None
    max_tokens_limit: int = Field(4096, ge=1)
    # Structured output (Sampling.response_format, worker/constraints.py): the largest schema/regex/grammar text, the
    # compiler's work limits (llguidance lexer fuel at compile and per mask step, grammar symbols), compiled formats
    # kept (LRU by content), llguidance's mask threads (0 = its default).
    constraint_max_bytes: int = Field(64 * 1024, ge=1)
    constraint_lexer_fuel: int = Field(1_000_000, ge=1)
    constraint_step_fuel: int = Field(200_000, ge=1)
    constraint_max_grammar_size: int = Field(500_000, ge=1)
    constraint_cache_size: int = Field(256, ge=1)
    constraint_threads: int = Field(0, ge=0)
    max_prompt_tokens: int = Field(16_384, ge=1)  # a turn's input; longer is INVALID_ARGUMENT (the seed's context)
    default_max_tokens: int = Field(256, ge=1)
    cache_bytes: int = Field(1 << 30, ge=0)  # local LRU of recent session states (host memory)
    # What the state records this worker writes to Redis (sessions, prefix cache) keep their tensors in: bf16 or
    # fp16 halve them (the engine still computes in fp32; see docs/benchmarks.md for the drift). Records of any
    # storage dtype are read back, whatever this says.
    state_storage_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # The largest preset upload (PrepareState) this worker reads; the front's max_preset_mb should not exceed it.
    max_preset_mb: int = Field(64, ge=1)

    # Shutdown: stop taking turns, let running ones finish for drain_s, then stop the server with grace_s.
    drain_s: float = Field(30.0, ge=0)
    grace_s: float = Field(5.0, ge=0)
