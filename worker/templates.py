"""Chat templates: how a session's system prompt and user turns become model input, and how a reply ends.

The formats match what the models were trained on (and tuning/data.py's renderer):
  chat       "User: {text}\\n\\nAssistant: {reply}\\n\\n"            (ChatRWKV, RWKV-Runner)
  one-state  "<s>" once, then "User:{text}\\n\\n</s>Assistant:{reply}\\n\\n</s>"  (RWKV one-state chat models)
  raw        the text as is; only the sampling parameters stop generation
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidArgument

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
