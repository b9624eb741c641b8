"""Chat templates: how a session's system prompt and user turns (or a whole list of messages) become model input,
and how a reply ends. Torch-free: the worker, the front and the gateway render with the same code.

The formats match what the models were trained on (and tuning/data.py's renderer):
  chat       "User: {text}\\n\\nAssistant: {reply}\\n\\n"            (ChatRWKV, RWKV-Runner)
  one-state  "<s>" once, then "User:{text}\\n\\n</s>Assistant:{reply}\\n\\n</s>"  (RWKV one-state chat models)
  raw        the text as is; only the sampling parameters stop generation
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.tools import TOOL_ROLE, render_tool_result

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def clean_turn_text(text: str) -> str:
    """Strips a turn and collapses blank lines: a blank line ("\\n\\n") ends a turn in RWKV chat formats."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format."""

    name: str
    start: str  # fed once, before the system prompt and the first turn
    sep: str  # between a role name and its text
    end: str  # closes every turn; also what generation stops at
    stop_strings: tuple[str, ...]  # the assistant's reply ends at any of these
    formatted: bool = True  # False for raw: text goes in untouched

    def prefix(self, system_prompt: str) -> str:
        """Text that opens a new session's state (before its first turn); may be empty."""
        if not self.formatted:
            return system_prompt
        system = f"System{self.sep}{clean_turn_text(system_prompt)}{self.end}" if system_prompt.strip() else ""
        return self.start + system

    def user_turn(self, text: str) -> str:
        """The prompt fed for one user turn, ending where the assistant's reply begins."""
        if not self.formatted:
            return text
        return f"User{self.sep}{clean_turn_text(text)}{self.end}Assistant{self.sep.rstrip()}"

    def epilogue(self) -> str:
        """Closes the assistant's reply when generation stopped without producing the turn's end."""
        return self.end


TEMPLATES: dict[str, ChatTemplate] = {
    "chat": ChatTemplate("chat", start="", sep=": ", end="\n\n", stop_strings=("\n\n",)),
    "one-state": ChatTemplate("one-state", start="<s>", sep=":", end="\n\n</s>", stop_strings=("\n\n</s>", "</s>")),
    "raw": ChatTemplate("raw", start="", sep="", end="", stop_strings=(), formatted=False),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InvalidArgument(f"unknown chat template {name!r} (expected one of {', '.join(TEMPLATES)})") from None


# ---- whole conversations (ChatMessage lists) -------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")

# The public enum (common.proto ChatTemplate) <-> the names above; UNSPECIFIED (0) means chat.
TEMPLATE_NAMES: dict[int, str] = {1: "chat", 2: "one-state", 3: "raw"}


def template_from_enum(value: int) -> str:
    """ChatTemplate enum number -> template name (0, unspecified, is chat); InvalidArgument for unknown numbers."""
    if value == 0:
        return "chat"
    try:
        return TEMPLATE_NAMES[value]
    except KeyError:
        raise InvalidArgument(f"unknown chat template {value}") from None


@dataclass(frozen=True)
class Message:
    """One message of a conversation given whole (api.proto ChatMessage)."""

    role: str  # system, user, assistant or tool
    content: str
    name: str = ""  # role tool: the tool whose result this is (optional)


def check_messages(messages: Sequence[Message], *, max_messages: int, session: bool = False) -> None:
    """The rules a conversation must follow (InvalidArgument otherwise): 1..max_messages messages, known roles,
    the last one user or tool (the reply follows it); on a session, a system message only first (it stands in
    for the session's system prompt, see worker/runner.py)."""
    if not messages:
        raise InvalidArgument("messages is empty: give at least one message (the last one user or tool)")
    if len(messages) > max_messages:
        raise InvalidArgument(f"{len(messages)} messages; the limit is {max_messages}")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role is {m.role[:40]!r}; expected one of {', '.join(ROLES)}")
        if m.name and m.role != "tool":
            raise InvalidArgument(f"messages[{i}].name is only for role tool")
        if session and m.role == "system" and i > 0:
            raise InvalidArgument(f"messages[{i}]: on a session a system message may only come first")
    if messages[-1].role not in ("user", "tool"):
        raise InvalidArgument(f"the last message is {messages[-1].role!r}; it must be user or tool (the reply "
                              "follows it)")


def render_messages(template: ChatTemplate, messages: Sequence[Message]) -> list[tuple[str, ...]]:
    """The text of each message in `template`'s format, in order, as the pieces that are tokenized one by one
    (each piece exactly as a session tokenizes its input, so one conversation gives the same tokens either way).

    Segment 0 is the conversation's opening, template.prefix(first system message or ""), as a new session's
    state starts (possibly empty). Then one segment per further message:
      user       template.user_turn(text) when the reply or an assistant message follows it (the session's user
                 turn, ending at "Assistant:"), else "User: text" + end
      assistant  (text, end): the reply exactly as given (send a reply back as it was streamed, leading space
                 included, and the tokens are the session's), then the template's turn end (a session's epilogue),
                 each tokenized alone; preceded by the assistant's opening when the message before it did not end
                 with one
      tool       as user, with the role "Tool"; a message that names its tool carries the tool-call format's result
                 body, {"name": ..., "content": ...} (common/tools.py render_tool_result), else its text as is
      system     (a later one) "System: text" + end
    User, tool and system text is cleaned as a session's turns are (clean_turn_text: stripped, blank lines
    collapsed). The caller checks the rules (check_messages)."""
    if not template.formatted:
        raise InvalidArgument("messages need the chat or one-state template (raw has no roles)")
    opening = f"Assistant{template.sep.rstrip()}"
    first_system = bool(messages) and messages[0].role == "system"
    segments: list[tuple[str, ...]] = [(template.prefix(messages[0].content if first_system else ""),)]
    body = messages[1:] if first_system else messages
    opened = False  # the text so far ends with the assistant's opening
    for i, m in enumerate(body):
        follows = body[i + 1].role if i + 1 < len(body) else "assistant"  # the reply follows the last message
        if m.role == "assistant":
            segments.append((("" if opened else opening) + m.content, template.end))
            opened = False
            continue
        text = clean_turn_text(m.content)
        if m.role == "tool" and m.name:  # the tool-call format's result body (common/tools.py), one format everywhere
            text = clean_turn_text(render_tool_result(m.name, m.content))
        role = {"user": "User", "tool": TOOL_ROLE, "system": "System"}[m.role]
        opened = follows == "assistant" and m.role != "system"
        segments.append((f"{role}{template.sep}{text}{template.end}" + (opening if opened else ""),))
    return segments


def messages_text(template: ChatTemplate, messages: Sequence[Message]) -> str:
    """The whole conversation as one text (render_messages joined): what the model reads, for display or for a
    caller that needs the characters (the worker feeds the pieces tokenized one by one, not this)."""
    return "".join(piece for segment in render_messages(template, messages) for piece in segment)
