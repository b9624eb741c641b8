"""A built-in corpus: question/answer dialogues drawn from the stdlib's `pydoc_data.topics`."""

from __future__ import annotations

import random
import re
import textwrap
from collections.abc import Collection, Iterator

from tuning.dialogues import Dialogue, Turn

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
