"""A turn's input as token ids: its text (a chat turn in the template's user-turn form) and token ids, or its
messages (common/templates.py render_messages), each piece tokenized alone, exactly as a session tokenizes its
system prompt, its user turns and its replies' closing, so one conversation gives the same tokens either way.

Without a session, every message but the last is a segment of its own (`head`: a prefix-cache boundary each); on a
session the messages continue its state as one input, and a leading system message opens a session that has no
system prompt yet (before its first turn) in the system prompt's place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.store import SessionMeta
from common.templates import ChatTemplate, check_messages, render_messages
from common.worker_api import InputKind, TurnInput


@dataclass(frozen=True)
class Prompt:
    """`head` segments prefilled first (a stateless conversation's messages but the last), then `tokens`, the
    generating turn's input."""

    head: list[list[int]]
    tokens: list[int]
    chat: bool  # the template's stop strings and closing apply
    system: str | None = None  # a session turn's leading system message (it opens a new session's state)

    @property
    def total(self) -> int:
        return len(self.tokens) + sum(len(s) for s in self.head)


class PromptBuilder:
    """Builds and checks turns' prompts (max_messages, max_prompt_tokens)."""

    def __init__(self, tokenize: Callable[[str], Awaitable[list[int]]], *, max_messages: int,
                 max_prompt_tokens: int) -> None:
        self._tokenize = tokenize
        self.max_messages, self.max_prompt_tokens = max_messages, max_prompt_tokens

    async def build(self, turn: TurnInput, template: ChatTemplate, meta: SessionMeta | None = None) -> Prompt:
        """The turn's prompt; `meta` when it continues a session. InvalidArgument for input that breaks a rule."""
        if not turn.messages:
            chat = turn.kind is InputKind.CHAT
            text = template.user_turn(turn.text) if chat else turn.text
            tokens = [*(await self._tokenize(text) if text else []), *turn.token_ids]
            if not tokens:
                raise InvalidArgument("the turn has no input (empty text and no token ids)")
            return self._limited(Prompt([], tokens, chat))
        if turn.text or turn.token_ids:
            raise InvalidArgument("give either text (and token ids) or messages, not both")
        check_messages(turn.messages, max_messages=self.max_messages, session=meta is not None)
        segments = []
        for pieces in render_messages(template, turn.messages):
            segments.append([t for piece in pieces if piece for t in await self._tokenize(piece)])
        if meta is None:
            return self._limited(Prompt(segments[:-1], segments[-1], True))
        system = None
        if turn.messages[0].role == "system":
            if meta.version > 0 or meta.system_prompt:
                raise InvalidArgument(f"session {meta.session_id} has its system prompt already (it is set before "
                                      "the first turn): a system message may only open a session that has none")
            system = turn.messages[0].content
        return self._limited(Prompt([], [t for segment in segments[1:] for t in segment], True, system))

    def _limited(self, prompt: Prompt) -> Prompt:
        if prompt.total > self.max_prompt_tokens:
            raise InvalidArgument(f"the turn's input is {prompt.total} tokens; the limit is {self.max_prompt_tokens}")
        if not prompt.tokens:
            raise InvalidArgument("the turn's last message has no tokens")
        return prompt
