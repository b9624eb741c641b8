"""Dialogues (turns with a role) and the loaders that read them from JSONL, Cornell and Ubuntu corpora."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.tools import assistant_text, offer_tools, parse_tools, render_tool_result

# --------------------------------------------------------------------------------------------------
# Dialogue model
# --------------------------------------------------------------------------------------------------

Role = Literal["user", "assistant", "system", "tool"]
ROLES: tuple[str, ...] = ("user", "assistant", "system", "tool")  # tool: a tool's result (common/tools.py format)


@dataclass(frozen=True)
class Turn:
    """One utterance of a dialogue."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(self.text, str):
            raise ValueError(f"turn text must be a string, got {type(self.text).__name__}")


Dialogue = list[Turn]


def _alternate(texts: list[str], first: Role = "user") -> Dialogue:
    """Assign alternating user/assistant roles, dropping a trailing user turn (nothing to learn from it)."""
    other: Role = "assistant" if first == "user" else "user"
    turns = [Turn(first if i % 2 == 0 else other, t) for i, t in enumerate(texts)]
    while turns and turns[-1].role != "assistant":
        turns.pop()
    return turns


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _message_text(content: Any) -> str:
    """OpenAI content is a string or a list of typed parts; only text parts carry anything we can train on."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {content!r:.60}")


def _dialogue_from_json(obj: Any) -> Dialogue:
    """Parse one JSONL record in either the `turns` or the OpenAI `messages` style."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "turns" in obj:
        items, text_key = obj["turns"], "text"
    elif "messages" in obj:
        items, text_key = obj["messages"], "content"
    else:
        raise ValueError("expected a 'turns' or 'messages' list")
    if not isinstance(items, list) or not items:
        raise ValueError("'turns'/'messages' must be a non-empty list")
    turns: Dialogue = []
    names: dict[str, str] = {}  # tool call id -> the function it called (for the tool messages answering it)
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "role" not in item or (text_key not in item and not item.get("tool_calls")):
            raise ValueError(f"item {i} needs 'role' and '{text_key}'")
        raw = item.get(text_key) or ""
        text = raw if text_key == "text" else _message_text(raw)
        if item.get("tool_calls"):
            text = assistant_text(text, [_call(c, i, names) for c in item["tool_calls"]])
        elif item["role"] == "tool":
            name = item.get("name") or names.get(str(item.get("tool_call_id", "")))
            if not name:
                raise ValueError(f"item {i}: a tool message needs 'name' or the 'tool_call_id' of an earlier call")
            text = render_tool_result(name, text)
        turns.append(Turn(item["role"], text))
    tools = obj.get("tools")
    if tools:  # offered in the system prompt, as the gateway offers a request's tools
        offered = parse_tools(tools)
        if turns and turns[0].role == "system":
            turns[0] = Turn("system", offer_tools(turns[0].text, offered))
        else:
            turns.insert(0, Turn("system", offer_tools("", offered)))
    return turns


def _call(call: Any, i: int, names: dict[str, str]) -> dict[str, Any]:
    """An OpenAI tool call ({"id", "function": {"name", "arguments"}}, or {"name", "arguments"}) as name +
    arguments; records its name by id."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"item {i}: a tool call is {{\"function\": {{\"name\", \"arguments\"}}}}")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments or "{}")
    if not isinstance(arguments, dict):
        raise ValueError(f"item {i}: a tool call's arguments must be a JSON object")
    if call.get("id"):
        names[str(call["id"])] = fn["name"]
    return {"name": fn["name"], "arguments": arguments}


def load_jsonl(path: str | Path) -> Iterator[Dialogue]:
    """Read dialogues from JSONL: `{"turns": [{role, text}]}` or `{"messages": [{role, content}]}` per line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                dialogue = _dialogue_from_json(json.loads(line))
            except ValueError as e:  # JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{lineno}: {e}") from None
            yield dialogue


_CORNELL_SEP = " +++$+++ "


def load_cornell(folder: str | Path) -> Iterator[Dialogue]:
    """Read the Cornell Movie-Dialogs corpus; alternate lines of a conversation become user/assistant."""
    folder = Path(folder)
    lines: dict[str, str] = {}
    # The corpus predates UTF-8 everywhere: it is ISO-8859-1, and decoding as UTF-8 fails on its accents.
    with open(folder / "movie_lines.txt", encoding="iso-8859-1") as f:
        for raw in f:
            # Strip only the newline: an empty utterance leaves a trailing separator we must still split on.
            fields = raw.rstrip("\r\n").split(_CORNELL_SEP, 4)
            if len(fields) == 5:
                lines[fields[0].strip()] = fields[4].strip()
    with open(folder / "movie_conversations.txt", encoding="iso-8859-1") as f:
        for raw in f:
            fields = raw.rstrip("\r\n").split(_CORNELL_SEP)
            if len(fields) < 4:
                continue
            texts: list[str] = []
            for line_id in re.findall(r"'([^']+)'", fields[3]):
                text = lines.get(line_id, "")
                if not text:  # a hole breaks the alternation; keep the coherent prefix only
                    break
                texts.append(text)
            dialogue = _alternate(texts)
            if dialogue:
                yield dialogue


def _ubuntu_turns(context: str) -> list[str]:
    """Split an Ubuntu context into speaker turns; utterances of one speaker are joined by newlines."""
    if "__eot__" in context:
        raw_turns = context.split("__eot__")
    else:  # v1 CSV marks utterances only (__EOS__), with no speaker changes: treat each as a turn
        raw_turns = context.split("__EOS__")
    turns = []
    for raw in raw_turns:
        utterances = [u.strip() for u in raw.split("__eou__") if u.strip()]
        if utterances:
            turns.append("\n".join(utterances))
    return turns


def _ubuntu_csv(path: Path) -> Iterator[Dialogue]:
    """Ubuntu v2 (or v1) CSV: train (`Context,Utterance,Label`) or test (`Context,Ground Truth Utterance,...`)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        cols = {name.strip().lower(): i for i, name in enumerate(header)}
        ctx_i = cols.get("context")
        resp_i = cols.get("utterance", cols.get("ground truth utterance"))
        label_i = cols.get("label")
        if ctx_i is None or resp_i is None:
            raise ValueError(f"{path}: header {header} lacks Context and Utterance columns")
        for row in reader:
            try:
                # Label 0 rows pair the context with a random distractor: not a real reply.
                if label_i is not None and float(row[label_i]) != 1.0:
                    continue
                texts = _ubuntu_turns(row[ctx_i]) + _ubuntu_turns(row[resp_i])[:1]
            except (IndexError, ValueError) as e:
                raise ValueError(f"{path}:{reader.line_num}: bad row ({e})") from None
            if len(texts) < 2:
                continue
            # Count roles back from the reply so that the true response is always the assistant's.
            yield _alternate(texts, "assistant" if len(texts) % 2 == 1 else "user")


def _ubuntu_tsv(path: Path) -> Dialogue:
    """Ubuntu v1 raw dialog file: `date<TAB>from<TAB>to<TAB>text` lines; the first speaker is the user."""
    texts: list[str] = []
    speakers: list[str] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            fields = raw.rstrip("\r\n").split("\t", 3)
            if len(fields) < 4 or not fields[3].strip():
                continue
            speaker, text = fields[1], fields[3].strip()
            if speakers and speakers[-1] == speaker:  # consecutive lines of one speaker form one turn
                texts[-1] += "\n" + text
            else:
                speakers.append(speaker)
                texts.append(text)
    first_speaker = speakers[0] if speakers else ""
    turns = [Turn("user" if s == first_speaker else "assistant", t) for s, t in zip(speakers, texts)]
    while turns and turns[-1].role != "assistant":
        turns.pop()
    return turns


def load_ubuntu(path: str | Path) -> Iterator[Dialogue]:
    """Read the Ubuntu Dialogue Corpus: a v2/v1 CSV file, a v1 `.tsv` dialog, or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.tsv"))
    elif path.suffix == ".tsv":
        files = [path]
    else:
        yield from _ubuntu_csv(path)
        return
    for file in files:
        dialogue = _ubuntu_tsv(file)
        if dialogue:
            yield dialogue
