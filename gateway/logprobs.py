"""OpenAI's logprobs from the SDK's TokenLogprob entries (with the tokens' bytes from the workers' vocabulary).

A choice's entries are kept in step with its text (`Aligner`): an entry goes out once the text sent covers its
token's bytes, so a token that is part of a UTF-8 character goes out with the delta that completes the character.
At the end only the tokens that begin within the reply are kept: those of a stop string are not part of the reply
(its text stops before it), and one that begins in the reply and runs into the stop string is. So the joined
`bytes` of a choice's entries are its reply's UTF-8 bytes, or run on into the stop string inside that last token.

Shapes: chat completions and the Responses API `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`
(token: the bytes as text, a partial character as U+FFFD; bytes: the exact bytes as ints); legacy completions
`{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}` (offsets in characters of the text).
"""

from __future__ import annotations

import codecs
import math
from collections import deque
from typing import Any

from gateway.errors import bad_request
from rwkv_serve.contract import MAX_LOGPROBS
from rwkv_serve_client import TextDelta, TokenLogprob

# What OpenAI reports for a token with no probability at all (JSON has no -Infinity).
FLOOR = -9999.0


def wire_logprobs(enabled: bool, top: int | None, param: str = "top_logprobs") -> int | None:
    """Sampling.logprobs for a request that asks for `top` alternatives per token (at least 1: the wire's 0 means
    no logprobs, and the chosen token's own logprob comes with its alternatives). None: not asked."""
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(f"{param} must be between 0 and {MAX_LOGPROBS}, not {top}", param)
    if not enabled:
        if top:
            raise bad_request(f"{param} needs logprobs to be enabled", param)
        return None
    return max(1, top or 0)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _text(token_bytes: bytes) -> str:
    return token_bytes.decode("utf-8", errors="replace")


class Aligner:
    """One choice's logprob entries, released as the choice's text covers their tokens' bytes."""

    def __init__(self) -> None:
        self.sent = 0  # UTF-8 bytes of the text sent so far
        self.covered = 0  # bytes of the entries released so far
        self.pending: deque[TokenLogprob] = deque()

    def push(self, text: str, entries: list[TokenLogprob]) -> list[TokenLogprob]:
        """The entries that go out with `text` (a delta of the choice's text) once `entries` arrived with it."""
        self.sent += len(text.encode("utf-8"))
        self.pending.extend(entries)
        out = []
        while self.pending and self.covered + len(self.pending[0].token_bytes) <= self.sent:
            out.append(self._release())
        return out

    def finish(self) -> list[TokenLogprob]:
        """At the end of the choice: the entries left that begin within its text (the rest are a stop string's)."""
        out = []
        while self.pending and self.covered < self.sent:
            out.append(self._release())
        self.pending.clear()
        return out

    def _release(self) -> TokenLogprob:
        entry = self.pending.popleft()
        self.covered += len(entry.token_bytes)
        return entry


def text_and_entries(item: str | TextDelta) -> tuple[str, list[TokenLogprob]]:
    """A stream item's text and the logprob entries that came with it (plain text carries none)."""
    return (item.text, item.logprobs) if isinstance(item, TextDelta) else (item, [])


def aligned(text: str, entries: list[TokenLogprob]) -> list[TokenLogprob]:
    """The entries of a whole reply (as a stream of it would have released them)."""
    aligner = Aligner()
    return aligner.push(text, entries) + aligner.finish()


def chat_entry(entry: TokenLogprob, top: int) -> dict[str, Any]:
    """One token of chat completions' `logprobs.content` (and of Responses' output_text logprobs)."""
    return {"token": _text(entry.token_bytes), "logprob": _finite(entry.logprob), "bytes": list(entry.token_bytes),
            "top_logprobs": [{"token": _text(b), "logprob": _finite(p), "bytes": list(b)}
                             for (_, p), b in zip(entry.top[:top], _top_bytes(entry, top))]}


def _top_bytes(entry: TokenLogprob, top: int) -> list[bytes]:
    found = list(entry.top_bytes[:top])
    return found + [b""] * (min(top, len(entry.top)) - len(found))  # an older server sent no bytes


def chat_logprobs(entries: list[TokenLogprob], top: int) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs` object."""
    return {"content": [chat_entry(e, top) for e in entries], "refusal": None}


class LegacyLogprobs:
    """A completion choice's legacy `logprobs` objects; text offsets count characters across the whole choice."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.chars = 0  # characters of the choice's text before the next token
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def shape(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            tokens.append(_text(entry.token_bytes))
            logprobs.append(_finite(entry.logprob))
            offsets.append(self.chars)
            self.chars += len(self._decoder.decode(entry.token_bytes))
            top: dict[str, float] = {}
            for (_, p), b in zip(entry.top[:self.top], _top_bytes(entry, self.top)):
                top.setdefault(_text(b), _finite(p))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops if self.top else None,
                "text_offset": offsets}
