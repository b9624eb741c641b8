"""A turn runner's knobs (RunnerConfig, from the worker's settings) and a turn's SamplingParams from its sampling
fields: what worker/runner.py is configured with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.errors import InvalidArgument
from common.store.turns import TURN_RESULT_TTL_MS
from worker.sampler import SamplingParams

_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}
_TUPLE_FIELDS = ("banned_tokens", "stop_token_ids", "stop_strings")


def sampling_params(sampling: Mapping[str, Any], extra_stop_strings: tuple[str, ...] = ()) -> SamplingParams:
    """SamplingParams from a dict of set fields; the template's stop strings are always added."""
    unknown = set(sampling) - _PARAM_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown sampling fields {sorted(unknown)}")
    values = {k: (tuple(v) if k in _TUPLE_FIELDS else v) for k, v in sampling.items()}
    if extra_stop_strings:
        values["stop_strings"] = tuple(dict.fromkeys((*values.get("stop_strings", ()), *extra_stop_strings)))
    return SamplingParams(**values)


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's knobs (from the worker settings)."""

    model_id: str
    worker_id: str
    lease_ms: int = 30_000  # renewed every third of it while a turn runs
    prefix_ttl_ms: int = 86_400_000
    default_sampling: Mapping[str, Any] | None = None  # worker defaults under session defaults
    max_prompt_tokens: int = 16_384  # a turn's input (formatted text + token ids); longer is INVALID_ARGUMENT
    state_storage_dtype: str = "fp32"  # what the records written to Redis keep their tensors in (STORAGE_DTYPES)
    turn_result_ttl_ms: int = TURN_RESULT_TTL_MS  # how long a committed turn stays replayable under its turn id
    fault_after_commit: str = ""  # TEST ONLY: "exit" = os._exit(1) right after a commit, before turn_end
    prefix_cache: bool = True  # look up and store message-boundary states (off: prefill the same segments anyway)
    prefix_cache_max_bytes: int = 2 << 30  # total size of a model's prefix-cache entries in Redis (LRU beyond)
    max_messages: int = 256  # messages in one turn's input
    max_choices: int = 16  # n of one request

    @classmethod
    def from_settings(cls, settings: Any, model_id: str, worker_id: str) -> RunnerConfig:
        """The runner's knobs from the worker's settings (worker/settings.py WorkerSettings)."""
        return cls(model_id, worker_id, lease_ms=settings.lease_ms, prefix_ttl_ms=settings.prefix_ttl_ms,
                   default_sampling={"max_tokens": settings.default_max_tokens},
                   max_prompt_tokens=settings.max_prompt_tokens, state_storage_dtype=settings.state_storage_dtype,
                   turn_result_ttl_ms=settings.turn_result_ttl_ms, fault_after_commit=settings.fault_after_commit,
                   prefix_cache=settings.prefix_cache, prefix_cache_max_bytes=settings.prefix_cache_max_bytes,
                   max_messages=settings.max_messages, max_choices=settings.max_choices)


