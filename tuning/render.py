"""Rendering a dialogue in a chat template and tokenizing it into ids with a loss mask."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple, Protocol

import torch

from common.templates import TEMPLATES, clean_turn_text
from common.tools import CALL_OPEN, TOOL_ROLE
from tuning.dataset import TokenDataset
from tuning.dialogues import Dialogue

# --------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------

Template = Literal["chat", "one-state"]


class Segment(NamedTuple):
    """A piece of formatted dialogue text and whether the model is trained to produce it."""

    text: str
    trainable: bool


_ROLE_NAMES: dict[str, str] = {"user": "User", "assistant": "Assistant", "system": "System", "tool": TOOL_ROLE}


def format_dialogue(d: Dialogue, template: Template) -> list[Segment]:
    """Render a dialogue as text segments; the assistant's words and closing separator are trainable. The
    templates are the service's (common/templates.py), tool calls and results in its one tool-call format
    (common/tools.py): a tuned model writes calls exactly as the gateway's grammar and parser expect them."""
    spec = TEMPLATES.get(template)
    if spec is None or not spec.formatted:
        raise ValueError(f"unknown template {template!r} (expected chat or one-state)")
    pieces = [Segment(spec.start, False)]
    name_sep = spec.sep.rstrip()
    for turn in d:
        name, text = _ROLE_NAMES[turn.role], clean_turn_text(turn.text)
        if turn.role == "assistant":
            # The prompt at inference ends with "Assistant:" and the model writes the rest, including the
            # space before its first word (World tokens carry a leading space), so that space is a target.
            # A reply that is tool calls starts right at the colon, as the tool grammar (common/tools.py) has the
            # served model write it.
            lead = "" if text.startswith(CALL_OPEN) else spec.sep[len(name_sep):]
            pieces.append(Segment(name + name_sep, False))
            pieces.append(Segment(lead + text + spec.end, True))
        else:
            pieces.append(Segment(name + spec.sep + text + spec.end, False))
    # Merge neighbours with the same flag: an untrainable run is exactly the prompt the server would feed.
    merged: list[Segment] = []
    for p in pieces:
        if not p.text:
            continue
        if merged and merged[-1].trainable == p.trainable:
            merged[-1] = Segment(merged[-1].text + p.text, p.trainable)
        else:
            merged.append(p)
    return merged


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What tokenization needs: `worker.tokenizer.WorldTokenizer` or any stand-in."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def tokenize_dialogue(
    d: Dialogue, tokenizer: Tokenizer, template: Template, mask_user: bool = True, append_eos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = train on this token as a target) for one dialogue."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in format_dialogue(d, template):
        # Each segment is encoded on its own so the mask boundary falls exactly between tokens. Encoding
        # the whole string could merge bytes across a boundary (e.g. ":" + " Hi" into ": " + "Hi"), which
        # would leave a token half prompt, half answer. The per-segment split is also what inference sees:
        # the prompt "...Assistant:" is encoded alone and the model then emits " Hi". The cost is a token
        # sequence that can differ slightly from encoding the full text in one go.
        seg_ids = tokenizer.encode(seg.text)
        ids.extend(seg_ids)
        mask.extend([1 if (seg.trainable or not mask_user) else 0] * len(seg_ids))
    if append_eos:
        # End-of-text after each dialogue, as in RWKV pretraining data; learning to emit it is useful.
        ids.append(tokenizer.eos_id)
        mask.append(1)
    return ids, mask


def tokenize_dialogues(
    dialogues: Iterable[Dialogue],
    tokenizer: Tokenizer,
    template: Template,
    mask_user: bool = True,
    append_eos: bool = True,
    meta: dict[str, Any] | None = None,
) -> TokenDataset:
    """Tokenize dialogues into one flat TokenDataset (one document per non-empty dialogue)."""
    tokens, mask, offsets = array("i"), bytearray(), array("q", [0])
    for d in dialogues:
        if not d:
            continue
        ids, m = tokenize_dialogue(d, tokenizer, template, mask_user, append_eos)
        tokens.extend(ids)
        mask.extend(m)
        offsets.append(len(tokens))
    info = {"template": template, "mask_user": mask_user, "append_eos": append_eos,
            "eos_id": int(tokenizer.eos_id), "tokenizer": type(tokenizer).__name__}
    info.update(meta or {})
    return TokenDataset(
        tokens=_from_buffer(tokens, torch.int32),
        mask=_from_buffer(mask, torch.uint8),
        offsets=_from_buffer(offsets, torch.int64),
        meta=info,
    )


def _from_buffer(buf: array | bytearray, dtype: torch.dtype) -> torch.Tensor:
    """Copy a compact Python buffer into a tensor (a list of Python ints would cost ~30x the memory)."""
    if len(buf) == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).clone()
