"""Dialogue corpora -> chat-template text -> token ids with a loss mask, saved for the trainer."""

from __future__ import annotations

import csv
import json
import random
import re
import struct
import textwrap
from array import array
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Dialogue model
# --------------------------------------------------------------------------------------------------

Role = Literal["user", "assistant", "system"]
ROLES: tuple[str, ...] = ("user", "assistant", "system")


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
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "role" not in item or text_key not in item:
            raise ValueError(f"item {i} needs 'role' and '{text_key}'")
        text = item[text_key] if text_key == "text" else _message_text(item[text_key])
        turns.append(Turn(item["role"], text))
    return turns


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


_HEADING_RULE = re.compile(r"([*=\-~^])\1+")
_FOOTNOTE_REF = re.compile(r" \[\d+\]")
_QUESTIONS = (
    "What does the Python documentation say about {}?",
    "Can you explain {} in Python?",
    "Tell me about {} in Python.",
    "I'm reading the Python language reference. What does it say about {}?",
    "Give me a short overview of {} in Python.",
)


def _doc_sections(text: str) -> list[tuple[str, list[str]]]:
    """Split a pydoc topic into (heading, body lines); headings are lines underlined with *, =, - ..."""
    lines = text.split("\n")
    sections: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if lines[i].strip() and _HEADING_RULE.fullmatch(nxt) and len(nxt) == len(lines[i].rstrip()):
            sections.append((lines[i].strip(), []))
            i += 2
            continue
        if sections:
            sections[-1][1].append(lines[i])
        i += 1
    return sections


def _doc_paragraphs(body: list[str]) -> list[str]:
    """Paragraphs of a section: wrapped prose re-flowed onto one line, code kept as is, tables dropped."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", "\n".join(body)):
        block = textwrap.dedent(block.strip("\n")).rstrip()
        if not block.strip():
            continue
        if block.startswith("-[ "):  # "-[ Footnotes ]-" and the like: the rest of the section is apparatus
            break
        if block.lstrip().startswith(("+-", "|")):  # ASCII tables do not survive trimming
            continue
        rows = block.split("\n")
        indents = {len(r) - len(r.lstrip()) for r in rows}
        # The docs are hard-wrapped at ~70 columns: prose has long, uniformly indented lines, code is ragged.
        is_prose = (
            len(indents) == 1
            and all(len(r.strip()) >= 50 for r in rows[:-1])
            and not rows[0].lstrip().startswith(">>>")
        )
        if is_prose:
            block = _FOOTNOTE_REF.sub("", " ".join(r.strip() for r in rows))
        paragraphs.append(block)
    return paragraphs


def _trim(paragraphs: list[str], max_chars: int) -> str:
    """Leading paragraphs that fit in max_chars; a too-long first one is cut at a sentence end."""
    kept: list[str] = []
    for p in paragraphs:
        if len("\n\n".join(kept + [p])) > max_chars:
            break
        kept.append(p)
    if not kept and paragraphs:
        head = paragraphs[0][:max_chars]
        cut = max(head.rfind(". "), head.rfind(".\n"))
        kept = [head[: cut + 1] if cut > 0 else head.rsplit(" ", 1)[0] + " ..."]
    # A last paragraph ending in ':' introduces an example we cut off; it reads better without it.
    if len(kept) > 1 and kept[-1].endswith(":"):
        kept.pop()
    return "\n\n".join(kept).strip()


_PROPER_NOUNS = {"Python", "Unicode"}


def _humanize(title: str) -> str:
    """'Capture Patterns' -> 'capture patterns' so it reads inside a question; acronyms and names stay."""
    words = title.split(" ")
    return " ".join(
        w.lower() if w[:1].isupper() and w[1:].islower() and w not in _PROPER_NOUNS else w for w in words
    )


def pydoc_dialogues(
    seed: int = 0, max_chars: int = 600, min_chars: int = 40, topics: Collection[str] | None = None
) -> Iterator[Dialogue]:
    """Question/answer dialogues from the stdlib `pydoc_data.topics`, one per documentation section.

    `topics` keeps only those topic names (e.g. to hold whole topics out for validation)."""
    from pydoc_data.topics import topics as all_topics  # stdlib, but a large module: import only when asked for

    # The text depends on the Python version that ships pydoc_data; for one version the output is fixed.
    rng = random.Random(seed)
    for name in sorted(all_topics):
        for title, body in _doc_sections(all_topics[name]):
            answer = _trim(_doc_paragraphs(body), max_chars)
            if len(answer) < min_chars:
                continue
            # Drawn for every section, kept or not, so a dialogue reads the same whatever `topics` selects.
            question = rng.choice(_QUESTIONS).format(_humanize(title))
            if topics is None or name in topics:
                yield [Turn("user", question), Turn("assistant", answer)]


# --------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------

Template = Literal["chat", "one-state"]


class Segment(NamedTuple):
    """A piece of formatted dialogue text and whether the model is trained to produce it."""

    text: str
    trainable: bool


@dataclass(frozen=True)
class _TemplateSpec:
    start: str  # before the first turn
    sep: str  # between the role name and the text
    end: str  # closes every turn


_TEMPLATES: dict[str, _TemplateSpec] = {
    # RWKV chat format as in ChatRWKV and RWKV-Runner: "\n\n" ends a turn (and is the stop string).
    "chat": _TemplateSpec(start="", sep=": ", end="\n\n"),
    # The one-state-chat model's format: <s> opens the dialogue, </s> closes every turn.
    "one-state": _TemplateSpec(start="<s>", sep=":", end="\n\n</s>"),
}
_ROLE_NAMES: dict[str, str] = {"user": "User", "assistant": "Assistant", "system": "System"}
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def clean_turn_text(text: str) -> str:
    """Strip a turn and collapse blank lines, because a blank line ('\\n\\n') ends a turn in RWKV chat."""
    # Only the newlines are collapsed: the indentation of the following line (code) survives.
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


def format_dialogue(d: Dialogue, template: Template) -> list[Segment]:
    """Render a dialogue as text segments; the assistant's words and closing separator are trainable."""
    spec = _TEMPLATES.get(template)
    if spec is None:
        raise ValueError(f"unknown template {template!r} (expected one of {', '.join(_TEMPLATES)})")
    pieces = [Segment(spec.start, False)]
    name_sep = spec.sep.rstrip()
    for turn in d:
        name, text = _ROLE_NAMES[turn.role], clean_turn_text(turn.text)
        if turn.role == "assistant":
            # The prompt at inference ends with "Assistant:" and the model writes the rest, including the
            # space before its first word (World tokens carry a leading space), so that space is a target.
            pieces.append(Segment(name + name_sep, False))
            pieces.append(Segment(spec.sep[len(name_sep):] + text + spec.end, True))
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


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

_FORMAT = "rwkv-serve-tuning-data"
_FORMAT_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class TokenDataset:
    """Concatenated dialogues: tokens (int32), loss mask (uint8) and document offsets (int64, n_docs + 1)."""

    tokens: torch.Tensor  # (N,) int32: 65536 ids fit, int64 would double the file
    mask: torch.Tensor  # (N,) uint8: 1 where the token is a training target
    offsets: torch.Tensor  # (n_docs + 1,) int64: document i is tokens[offsets[i]:offsets[i + 1]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.mask.shape != self.tokens.shape:
            shapes = f"tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}"
            raise ValueError(f"{shapes}: must be 1-D and of equal length")
        o = self.offsets
        if o.dim() != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.tokens) or bool((o[1:] < o[:-1]).any()):
            raise ValueError("offsets must rise from 0 to len(tokens)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens, eos included."""
        return len(self.tokens)

    @property
    def num_trainable(self) -> int:
        """Tokens that are training targets."""
        return int(self.mask.sum())

    def document(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask of dialogue i."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]

    # -- files --

    def save(self, path: str | Path) -> None:
        """Write a `.pt` file of plain tensors and a plain dict, loadable with weights_only=True."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, **self.meta}
        torch.save({"tokens": self.tokens, "mask": self.mask, "offsets": self.offsets, "meta": meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> TokenDataset:
        """Read a file written by save()."""
        # weights_only: a data file must not be able to run code when opened.
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("meta", {}).get("format") != _FORMAT:
            raise ValueError(f"{path}: not a {_FORMAT} file")
        if obj["meta"].get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: version {obj['meta'].get('version')}, expected {_FORMAT_VERSION}")
        meta = {k: v for k, v in obj["meta"].items() if k not in ("format", "version")}
        return cls(obj["tokens"], obj["mask"], obj["offsets"], meta)

    def save_binidx(self, prefix: str | Path) -> None:
        """Write RWKV-LM's binidx pair (`prefix.bin`, `prefix.idx`); tokens only, the mask has no place there."""
        # Megatron MMapIndexedDataset layout, as read by RWKV-LM's src/binidx.py: one sequence per document.
        if self.num_tokens and (int(self.tokens.min()) < 0 or int(self.tokens.max()) > 0xFFFF):
            raise ValueError("binidx stores uint16 tokens; ids must lie in 0..65535")
        prefix = str(prefix)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens.numpy().astype("<u2").tofile(prefix + ".bin")
        offsets = self.offsets.numpy()
        sizes = np.diff(offsets).astype("<i4")
        pointers = (offsets[:-1] * 2).astype("<i8")  # byte offsets into .bin (2 bytes per uint16 token)
        doc_idx = np.arange(len(sizes) + 1, dtype="<i8")  # document boundaries in sequence numbers
        with open(prefix + ".idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00")
            f.write(struct.pack("<Q", 1))  # version
            f.write(struct.pack("<B", 8))  # dtype code 8 = uint16
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())

    # -- views for training --

    def _select(self, indices: list[int]) -> TokenDataset:
        """A new dataset holding the given documents, in the given order."""
        o = self.offsets.tolist()
        spans = [(o[i], o[i + 1]) for i in indices]
        sizes = torch.tensor([b - a for a, b in spans], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        tokens = torch.cat([self.tokens[a:b] for a, b in spans]) if spans else self.tokens[:0]
        mask = torch.cat([self.mask[a:b] for a, b in spans]) if spans else self.mask[:0]
        return TokenDataset(tokens, mask, offsets, dict(self.meta))

    def split(self, val_fraction: float, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
        """(train, val) by whole dialogues, so no dialogue leaks across; documents keep their order."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)  # a requested split gets at least one dialogue on each side
        # random.Random rather than torch.randperm: its sequence is stable across library versions.
        val = set(random.Random(seed).sample(range(n), n_val))
        train_idx = [i for i in range(n) if i not in val]
        return self._select(train_idx), self._select(sorted(val))

    def batches(
        self, ctx_len: int, batch_size: int, seed: int = 0, num_batches: int | None = None
    ) -> Iterator[Batch]:
        """Random training windows: (input, target, mask), each (B, T); target is input shifted by one."""
        # mask lines up with target (mask[b, t] says whether target[b, t] counts); a window may hold no
        # trainable target, so the loss should be divided by mask.sum().clamp(min=1).
        n = self.num_tokens
        if n < ctx_len + 1:
            raise ValueError(f"{n} tokens cannot fill a window of {ctx_len} + 1")
        g = torch.Generator().manual_seed(seed)
        span = torch.arange(ctx_len + 1)
        done = 0
        while num_batches is None or done < num_batches:
            starts = torch.randint(0, n - ctx_len, (batch_size,), generator=g)
            idx = starts[:, None] + span  # (B, T + 1)
            window, m = self.tokens[idx].long(), self.mask[idx]  # (B, T + 1)
            yield window[:, :-1], window[:, 1:], m[:, 1:]
            done += 1

    def eval_windows(self, ctx_len: int) -> Iterator[Batch]:
        """Consecutive non-overlapping (1, T) windows whose targets cover every token after the first once."""
        # Consecutive windows let a recurrent model carry its state across them; the last one may be shorter.
        n = self.num_tokens
        for s in range(0, n - 1, ctx_len):
            e = min(s + ctx_len, n - 1)
            x, y = self.tokens[None, s:e], self.tokens[None, s + 1 : e + 1]  # (1, T)
            yield x.long(), y.long(), self.mask[None, s + 1 : e + 1]
