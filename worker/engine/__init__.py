"""The continuous-batching engine: turns join the running batch between steps and stream their tokens out.

One step (`Engine.step_sync`, run in the engine's own thread so the asyncio loop stays responsive) is
schedule -> run -> postprocess:
  scheduler.py  drop cancelled and expired turns, admit waiting turns into free slots, pick the decode lane (every
                decoding turn, one token each) and the prefill chunks, grouped by length (beside a decode lane
                within a token budget and the pacer's cost allowance, so a long prompt never stalls the others)
  pacing.py     what further prefill chunks may add to a step beside the lane, from the step parts' measured costs
  batch.py      one batched decode forward (B x 1), one forward per prefill group (B x T), sampling; times each
  scheduler.py  samples -> text deltas and stop decisions; finished turns hand back their final state (batch 1)
loop.py holds the Turn handles and the engine thread's bridge to asyncio; events.py the values handed out.

A turn's life: PREFILL (feed its prompt, chunk by chunk) -> DECODE (feed the last sampled token, sample the
next) -> CLOSING (feed the reply's last token and the template's epilogue, no sampling) -> finished.
The final state has consumed the prompt and every emitted token (plus the epilogue), never a stop token, so
the next turn continues exactly the conversation the user saw. A cancelled turn hands back no state.

A turn with a response_format (worker/constraints.py) samples under its grammar's token mask, filled while the
step's forwards run, and ends when the grammar is complete (CONSTRAINT_COMPLETE) or at max_tokens; stop strings and
stop tokens do not apply to it (docs/structured_output.md).

Knows nothing of gRPC or Redis: callers pass states and token ids in, and get events out.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rwkv_serve.contract import StopReason
from worker.engine.events import Delta, EngineEvent, EngineLoad, Finished, TurnTimings

if TYPE_CHECKING:
    from worker.engine.loop import Engine, Turn, TurnRequest

# The torch side is imported on first use, so that `worker.engine.scheduler` (and these plain values) can be
# imported without torch.
_LAZY = {"Engine": "worker.engine.loop", "Turn": "worker.engine.loop", "TurnRequest": "worker.engine.loop"}

__all__ = ["Delta", "Engine", "EngineEvent", "EngineLoad", "Finished", "StopReason", "Turn", "TurnRequest",
           "TurnTimings"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
