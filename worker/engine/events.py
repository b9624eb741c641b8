"""What the engine hands out: the events of a turn (Delta ... Finished), its phase times and the engine's load.

Plain values, no torch: the scheduler builds them, the loop delivers them, worker/runner.py reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rwkv_serve.contract import StopReason

if TYPE_CHECKING:
    from worker.sampler import SampleResult
    from worker.state import State


@dataclass(frozen=True)
class Delta:
    """Output of one generated token: its new text (possibly empty while held back), id and log-probability."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampleResult, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a turn."""

    reason: StopReason
    prompt_tokens: int  # input + epilogue tokens fed
    generated_tokens: int  # sampled tokens, a stop token included
    state: State | None  # batch size 1, None when cancelled
    tokens_consumed: int  # by `state` in total
    stop_string: str = ""
    stop_token_id: int = -1
    timings: TurnTimings | None = None  # when the turn went through the engine's phases (for tracing)


@dataclass(frozen=True)
class TurnTimings:
    """Wall-clock times (time.time_ns()) of a turn's phases in the engine; 0 = the phase was never reached.

    The engine runs in its own thread, outside any trace context: the caller turns these into queue, prefill
    and decode spans under the turn's span, with these start and end times."""

    submitted_ns: int
    admitted_ns: int  # left the queue for a batch slot
    prefilled_ns: int  # the whole input was fed (and the first token sampled)
    finished_ns: int


@dataclass(frozen=True)
class StepRecord:
    """One engine step, for Engine.on_step (a trace: RWKV_WORKER_STEP_TRACE). Times are time.time() seconds."""

    started: float
    seconds: float  # plan + forwards + sampling (not the postprocessing into events)
    lane: int  # decode lane rows
    prefill_tokens: int
    prefill_turns: int
    arrivals: tuple[float, ...]  # submit times of the turns whose first chunk ran in this step


# Not common.worker_api.TurnEvent (TurnStarted | TextDelta | TurnEnded), which worker/runner.py makes of these.
EngineEvent = Delta | Finished


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is."""

    capacity: int
    active: int
    queued: int
    max_queued: int
