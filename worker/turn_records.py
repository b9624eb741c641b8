"""What a turn leaves behind and sends: the digest of its input, the record a retry gets back, its deltas."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from common.store.turns import TurnRecord
from common.worker_api import TextDelta, TokenLogprob, TurnEnded, TurnInput
from worker.engine import Delta


def input_digest(turn: TurnInput) -> str:
    """What a turn asks for (kind, text, token ids, sampling overrides, messages), hashed: a turn id reused for
    another input is a new turn, not a replay of the old one."""
    what: list[Any] = [turn.kind.value, turn.text, list(turn.token_ids), dict(turn.sampling)]
    if turn.messages:
        what.append([[m.role, m.content, m.name] for m in turn.messages])
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:32]


def turn_record(turn: TurnInput, digest: str, ended: TurnEnded, text: str, token_ids: list[int],
            input_tokens: int) -> TurnRecord:
    """The result a retry of this turn gets back (stored with the commit)."""
    return TurnRecord(turn.turn_id, digest, text, tuple(token_ids), ended.prompt_tokens, ended.generated_tokens,
                      ended.state_tokens, int(ended.reason), ended.stop_string, ended.stop_token_id,
                      input_tokens=input_tokens, cached_tokens=ended.cached_tokens)


def text_delta(event: Delta, choice: int, tokenizer: Any) -> TextDelta:
    """The domain delta of an engine delta; each logprob with its token's bytes (and its alternatives')."""
    if not event.logprobs:
        return TextDelta(event.text, event.token_ids, (), choice)

    def token_bytes(token_id: int) -> bytes:
        try:
            return tokenizer.token_bytes(token_id)
        except (ValueError, IndexError, KeyError):  # an id of the model's padded vocabulary that no token has
            return b""

    logprobs = tuple(TokenLogprob(s.token_id, s.logprob, tuple((t, p, token_bytes(t)) for t, p in s.top_logprobs),
                                  token_bytes(s.token_id)) for s in event.logprobs)
    return TextDelta(event.text, event.token_ids, logprobs, choice)
