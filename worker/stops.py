"""Stop detection for streamed replies: stop strings held back until they can no longer match, stop tokens,
max tokens; UTF-8-safe detokenization on the way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from worker.sampler import SamplingParams


class StopStringMatcher:
    """Streams text, holding back anything that may still become a stop string; cuts at the first one."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self.stopped = False

    def _earliest_partial(self, text: str) -> int:
        """Smallest i such that text[i:] is a proper prefix of some stop string (len(text) if none)."""
        best = len(text)
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    best = min(best, len(text) - n)
                    break
        return best

    def push(self, text: str) -> str:
        """Text that can safely be shown; sets `stopped` once a stop string is certain to come first."""
        if self.stopped:
            raise RuntimeError("push after a stop string was found")
        held = self._held + text
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        partial = self._earliest_partial(held)
        if found:
            first = min(found)
            # A longer stop string that started earlier and is still incomplete could yet match first (stop
            # strings "abc" and "b" on "ab"): the cut point is only certain when no such prefix is pending.
            if partial >= first:
                self._held = ""
                self.stopped = True
                return held[:first]
        self._held = held[partial:]
        return held[:partial]

    def flush(self) -> str:
        """The held text at the end of generation, cut at a stop string if one is complete in it."""
        held, self._held = self._held, ""
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            return held[: min(found)]
        return held


class _Tokenizer(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class StopStep:
    """What one generated token adds to the stream, and whether generation ends here."""

    text: str
    reason: str | None = None  # 'stop_token', 'stop_string', 'max_tokens' or None (go on)

    @property
    def finished(self) -> bool:
        return self.reason is not None


class StopChecker:
    """Per request: turns generated ids into stream text and decides when and why generation stops."""

    def __init__(
        self,
        tokenizer: _Tokenizer,
        *,
        stop_token_ids: Sequence[int] = (0,),
        stop_strings: Sequence[str] = (),
        max_tokens: int = 256,
    ) -> None:
        from worker.tokenizer import IncrementalDecoder  # noqa: PLC0415 - keeps the sampler importable alone

        self._decoder = IncrementalDecoder(tokenizer)  # type: ignore[arg-type]
        self._matcher = StopStringMatcher(stop_strings)
        self._stop_ids = frozenset(stop_token_ids)
        self._max_tokens = max_tokens
        self.tokens_seen = 0
        self.reason: str | None = None

    @classmethod
    def from_params(cls, params: SamplingParams, tokenizer: _Tokenizer) -> StopChecker:
        return cls(tokenizer, stop_token_ids=params.stop_token_ids, stop_strings=params.stop_strings,
                   max_tokens=params.max_tokens)

    def _end(self, text: str, reason: str) -> StopStep:
        # Generation is over: release held bytes and held text, still cutting at a stop string in them.
        if not self._matcher.stopped:
            text += self._matcher.push(self._decoder.flush())
        if not self._matcher.stopped:
            text += self._matcher.flush()
        self.reason = "stop_string" if self._matcher.stopped else reason
        return StopStep(text, self.reason)

    def step(self, token_id: int) -> StopStep:
        """Account for one generated token."""
        if self.reason is not None:
            raise RuntimeError(f"generation already stopped ({self.reason})")
        self.tokens_seen += 1
        if token_id in self._stop_ids:  # the stop token itself is not part of the text
            return self._end("", "stop_token")
        text = self._matcher.push(self._decoder.push(token_id))
        if self._matcher.stopped:
            self.reason = "stop_string"
            return StopStep(text, self.reason)
        if self.tokens_seen >= self._max_tokens:
            return self._end(text, "max_tokens")
        return StopStep(text)

    def finish(self, reason: str = "cancelled") -> StopStep:
        """End early for a reason outside the checker (cancelled, context full): emit what is held."""
        if self.reason is not None:
            return StopStep("", self.reason)
        return self._end("", reason)
