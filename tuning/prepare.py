"""Command line: read a dialogue corpus, apply a chat template, tokenize, and write train/val datasets."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, cast

import typer
from rich.console import Console
from rich.table import Table

from tuning.data import (
    Dialogue,
    Template,
    TokenDataset,
    Tokenizer,
    load_cornell,
    load_jsonl,
    load_ubuntu,
    pydoc_dialogues,
    tokenize_dialogues,
)


class Source(str, Enum):
    """Corpus formats the command reads."""

    jsonl = "jsonl"
    cornell = "cornell"
    ubuntu = "ubuntu"
    pydoc = "pydoc"


class TemplateName(str, Enum):
    """Chat templates (see tuning.data.format_dialogue)."""

    chat = "chat"
    one_state = "one-state"


def load_source(
    source: Source, input_path: Path | None, seed: int = 0, max_answer_chars: int = 600
) -> Iterator[Dialogue]:
    """Dialogues from one corpus; every source but pydoc needs an input path."""
    if source is Source.pydoc:
        return pydoc_dialogues(seed=seed, max_chars=max_answer_chars)
    if input_path is None:
        raise ValueError(f"--input is required for --source {source.value}")
    loaders = {Source.jsonl: load_jsonl, Source.cornell: load_cornell, Source.ubuntu: load_ubuntu}
    return loaders[source](input_path)


def world_tokenizer() -> Tokenizer:
    """The serving tokenizer, so training ids match inference ids exactly."""
    from worker.tokenizer import WorldTokenizer  # imported late: tuning.data must not depend on the worker

    return WorldTokenizer()


def val_path(out: Path) -> Path:
    """Where the validation split goes: data/x.pt -> data/x.val.pt."""
    return out.with_suffix(".val.pt")


def prepare(
    dialogues: Iterator[Dialogue],
    tokenizer: Tokenizer,
    template: Template,
    out: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    mask_user: bool = True,
    binidx: bool = False,
    meta: dict[str, Any] | None = None,
) -> tuple[TokenDataset, TokenDataset | None]:
    """Tokenize, split by dialogue and save; returns (train, val or None)."""
    dataset = tokenize_dialogues(dialogues, tokenizer, template, mask_user=mask_user, meta=meta)
    if len(dataset) == 0:
        raise ValueError("no dialogues were read")
    if val_fraction > 0:
        train, val = dataset.split(val_fraction, seed)
    else:
        train, val = dataset, None
    train.save(out)
    if val is not None:
        val.save(val_path(out))
    if binidx:
        train.save_binidx(out.with_suffix(""))
    return train, val


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    source: Source = typer.Option(..., help="Corpus format."),
    input: Path | None = typer.Option(None, help="JSONL file, Cornell folder, Ubuntu CSV/TSV file or folder."),
    template: TemplateName = typer.Option(TemplateName.chat, help="Chat template."),
    out: Path = typer.Option(Path("data/train.pt"), help="Training split; the validation split goes to *.val.pt."),
    val_fraction: float = typer.Option(0.1, help="Share of dialogues held out for validation."),
    seed: int = typer.Option(0, help="Seed for the split and for pydoc question phrasing."),
    mask_user: bool = typer.Option(True, help="Train only on assistant tokens (--no-mask-user: on everything)."),
    binidx: bool = typer.Option(False, help="Also write the train split as RWKV-LM binidx (out without .pt)."),
    limit: int | None = typer.Option(None, help="Read at most this many dialogues."),
    max_answer_chars: int = typer.Option(600, help="pydoc: longest answer, in characters."),
) -> None:
    """Prepare a fine-tuning dataset and print dialogue and token counts."""
    console = Console()
    try:
        dialogues = load_source(source, input, seed=seed, max_answer_chars=max_answer_chars)
        if limit is not None:
            dialogues = itertools.islice(dialogues, limit)
        meta = {"source": source.value, "input": str(input) if input else None}
        train, val = prepare(
            dialogues, world_tokenizer(), cast(Template, template.value), out, val_fraction, seed, mask_user, binidx,
            meta,
        )
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None

    table = Table(title=f"{source.value} -> {template.value}")
    for col in ("split", "dialogues", "tokens", "trainable tokens", "file"):
        table.add_column(col, justify="left" if col in ("split", "file") else "right")
    splits = [("train", train, out)] + ([("val", val, val_path(out))] if val is not None else [])
    for name, ds, path in splits:
        table.add_row(name, f"{len(ds):,}", f"{ds.num_tokens:,}", f"{ds.num_trainable:,}", str(path))
    console.print(table)
    if binidx:
        console.print(f"binidx: {out.with_suffix('')}.bin / .idx")


if __name__ == "__main__":
    app()
