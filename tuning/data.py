"""Dialogue corpora -> chat-template text -> token ids with a loss mask, saved for the trainer.

The pipeline's parts live in their own modules; this one gathers their public names in one place:
  tuning.dialogues     the dialogue model (Turn, Dialogue) and the JSONL, Cornell and Ubuntu loaders
  tuning.pydoc_corpus  question/answer dialogues built from the stdlib's pydoc_data
  tuning.render        chat templates, per-segment tokenization and the loss mask
  tuning.dataset       TokenDataset: .pt and binidx files, train/val split, training and eval windows
"""

from __future__ import annotations

from tuning.dataset import Batch, TokenDataset
from tuning.dialogues import ROLES, Dialogue, Role, Turn, load_cornell, load_jsonl, load_ubuntu
from tuning.pydoc_corpus import pydoc_dialogues
from tuning.render import (
    Segment,
    Template,
    Tokenizer,
    clean_turn_text,
    format_dialogue,
    tokenize_dialogue,
    tokenize_dialogues,
)

__all__ = [
    "ROLES",
    "Batch",
    "Dialogue",
    "Role",
    "Segment",
    "Template",
    "TokenDataset",
    "Tokenizer",
    "Turn",
    "clean_turn_text",
    "format_dialogue",
    "load_cornell",
    "load_jsonl",
    "load_ubuntu",
    "pydoc_dialogues",
    "tokenize_dialogue",
    "tokenize_dialogues",
]
