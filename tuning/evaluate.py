"""Evaluation of a (fine-tuned or state-tuned) model: perplexity on a token dataset and BLEU of greedy replies.

Perplexity is counted, by default, per dialogue and on the loss-masked (assistant) tokens only: each dialogue
starts from the initial state (zeros, or a state-tuned preset), exactly as a new session would, and the
recurrent state is carried across consecutive `ctx_len` chunks of the dialogue, so no token loses context.
`stream=True` instead reads the whole file as one text (`TokenDataset.eval_windows`), the state carried from
window to window across dialogue boundaries, as in language-model pretraining.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

from tuning.data import TokenDataset, Tokenizer
from worker.model import RWKV5
from worker.state import State, load_time_state


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood over counted targets."""

    nll: float  # nats, summed over the counted targets
    tokens: int  # targets counted (assistant tokens when masked, else every predicted token)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per counted token (nats)."""
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.loss)


def batch_state(model: RWKV5, batch_size: int, base: State | None = None) -> State:
    """`base` (batch size 1) repeated over a batch on the model's device, or the zero state when None."""
    if base is None:
        return model.init_state(batch_size)
    return State(*(t.to(model.device, torch.float32).expand(-1, batch_size, *t.shape[2:]).contiguous()
                   for t in base.tensors()))


def _no_grad(model: RWKV5):
    # A trainable model records autograd in forward; evaluation must not (memory, speed).
    return torch.no_grad() if model.trainable else nullcontext()


def document_batches(ds: TokenDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Whole dialogues, longest first, padded at the end with token 0 and mask 0: (tokens, mask, valid), each (B, L);
    valid is 1 on real tokens, 0 on padding."""
    lengths = (ds.offsets[1:] - ds.offsets[:-1]).tolist()
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])  # similar lengths together: little padding
    for s in range(0, len(order), batch_size):
        docs = [ds.document(i) for i in order[s : s + batch_size]]
        width = max(len(t) for t, _ in docs)
        tokens = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros(len(docs), width, dtype=torch.uint8)
        valid = torch.zeros(len(docs), width, dtype=torch.uint8)
        for r, (t, m) in enumerate(docs):
            tokens[r, : len(t)], mask[r, : len(m)], valid[r, : len(t)] = t.long(), m, 1
        yield tokens, mask, valid


def perplexity(model: RWKV5, ds: TokenDataset, init_state: State | None = None, *, ctx_len: int = 256,
               batch_size: int = 8, masked: bool = True, stream: bool = False) -> Perplexity:
    """Perplexity of `ds` under `model` from `init_state` (see the module docstring for what is counted)."""
    nll, count = 0.0, 0
    with _no_grad(model):
        if stream:
            state = batch_state(model, 1, init_state)
            for x, y, m in ds.eval_windows(ctx_len):
                logits, state = model.forward(x.to(model.device), state, all_logits=True)
                n, c = _nll(logits, y, m if masked else torch.ones_like(m))
                nll, count = nll + n, count + c
            return Perplexity(nll, count)
        for tokens, mask, valid in document_batches(ds, batch_size):
            # Padding is at the end and the model is causal, so it never changes a real position's logits;
            # its targets are excluded (mask and valid are 0 there).
            keep = (mask if masked else valid)[:, 1:]
            x, y = tokens[:, :-1], tokens[:, 1:]
            state = batch_state(model, x.shape[0], init_state)
            for s in range(0, x.shape[1], ctx_len):  # the state carries the dialogue across chunks
                logits, state = model.forward(x[:, s : s + ctx_len].to(model.device), state, all_logits=True)
                n, c = _nll(logits, y[:, s : s + ctx_len], keep[:, s : s + ctx_len])
                nll, count = nll + n, count + c
    return Perplexity(nll, count)


def _nll(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the kept targets. logits (B, T, V) fp32; target, keep (B, T)."""
    keep = keep.to(logits.device).bool()
    if not keep.any():
        return 0.0, 0
    loss = F.cross_entropy(logits[keep].float(), target.to(logits.device)[keep], reduction="sum")
    return float(loss), int(keep.sum())


# ---------------------------------------------------------------------------------------------------------------
# BLEU of greedy replies
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One assistant reply to score: the conversation before it as the prompt, its text as the reference."""

    prompt: list[int]  # ends where the reply begins ("...Assistant:")
    reference: str


def reply_text(text: str) -> str:
    """A reply up to the end of its turn: both chat templates close a turn with a blank line."""
    return text.split("\n\n", 1)[0].strip()


def exchanges(ds: TokenDataset, tokenizer: Tokenizer, limit: int | None = None) -> list[Exchange]:
    """Every assistant reply of the dataset, found as a run of loss-masked tokens, with everything before it."""
    # The mask marks exactly the assistant's words and turn end (tuning.data.format_dialogue), so the dataset
    # alone gives prompts and references: no need to keep the raw dialogues beside the .pt file.
    if ds.meta.get("mask_user") is False:
        raise ValueError("BLEU needs the assistant's tokens marked: prepare the data with the loss mask (mask_user)")
    found: list[Exchange] = []
    for i in range(len(ds)):
        tokens, mask = (t.tolist() for t in ds.document(i))
        j = 0
        while j < len(tokens) and (limit is None or len(found) < limit):
            if not mask[j]:
                j += 1
                continue
            k = j
            while k < len(tokens) and mask[k]:
                k += 1
            if j > 0:
                reply = [t for t in tokens[j:k] if t != tokenizer.eos_id]
                found.append(Exchange(tokens[:j], reply_text(tokenizer.decode(reply))))
            j = k
    return found


def greedy_replies(model: RWKV5, tokenizer: Tokenizer, prompts: Sequence[list[int]], init_state: State | None = None,
                   *, max_new_tokens: int = 64, batch_size: int = 8, stop: str = "\n\n") -> list[str]:
    """Greedy continuations of each prompt until `stop`, end of text or `max_new_tokens`, as reply texts."""
    eos = tokenizer.eos_id
    n_vocab = getattr(tokenizer, "vocab_size", model.config.vocab_size)
    replies: list[str] = []
    with _no_grad(model):
        for s in range(0, len(prompts), batch_size):
            group = prompts[s : s + batch_size]
            firsts = [model.forward(torch.tensor([p], device=model.device), batch_state(model, 1, init_state))
                      for p in group]  # prompts differ in length: prefill one by one, then decode together
            logits, state = torch.cat([f[0] for f in firsts]), State.cat([f[1] for f in firsts])
            out: list[list[int]] = [[] for _ in group]
            done = [False] * len(group)
            for _ in range(max_new_tokens):
                nxt = logits[:, :n_vocab].argmax(-1)  # the head has ids the tokenizer cannot decode (World: 65530+)
                for r, tok in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if tok == eos:
                        done[r] = True
                    else:
                        out[r].append(tok)
                        done[r] = stop in tokenizer.decode(out[r][-8:])  # the stop string spans few tokens
                if all(done):
                    break
                logits, state = model.forward(nxt[:, None], state)
            replies.extend(reply_text(tokenizer.decode(o)) for o in out)
    return replies


def bleu(model: RWKV5, tokenizer: Tokenizer, ds: TokenDataset, init_state: State | None = None, *,
         limit: int | None = 100, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Corpus BLEU (sacrebleu, default 13a tokenization) of greedy replies against the dataset's assistant turns."""
    import sacrebleu  # imported here: only BLEU needs it

    found = exchanges(ds, tokenizer, limit)
    if not found:
        raise ValueError("the dataset has no assistant replies to score")
    hyps = greedy_replies(model, tokenizer, [e.prompt for e in found], init_state,
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hyps, [[e.reference for e in found]])
    return {"bleu": score.score, "signature": str(metric.get_signature()), "replies": len(found),
            "examples": [{"reference": e.reference, "reply": h} for e, h in list(zip(found, hyps))[:3]]}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def evaluate(model: RWKV5, ds: TokenDataset, tokenizer: Tokenizer | None, init_state: State | None = None, *,
             ctx_len: int = 256, batch_size: int = 8, masked: bool = True, stream: bool = False,
             bleu_limit: int | None = 100, max_new_tokens: int = 64) -> dict:
    """Perplexity (and BLEU when a tokenizer is given) from one initial state, as a JSON-ready dict."""
    p = perplexity(model, ds, init_state, ctx_len=ctx_len, batch_size=batch_size, masked=masked, stream=stream)
    row: dict = {"ppl": p.ppl, "loss": p.loss, "tokens": p.tokens,
                 "counted": "assistant tokens" if masked else "all tokens",
                 "context": "stream" if stream else "per dialogue from the initial state"}
    if tokenizer is not None and bleu_limit != 0:
        row.update(bleu(model, tokenizer, ds, init_state, limit=bleu_limit, max_new_tokens=max_new_tokens,
                        batch_size=batch_size))
    return row


def print_table(rows: dict[str, dict], title: str, console: Console | None = None) -> None:
    """Rows by name (e.g. 'zero state', 'tuned state') with perplexity, tokens and BLEU."""
    table = Table(title=title)
    for col in ("initial state", "ppl", "loss (nats)", "tokens", "BLEU"):
        table.add_column(col, justify="left" if col == "initial state" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['ppl']:.2f}", f"{r['loss']:.4f}", f"{r['tokens']:,}",
                      f"{r['bleu']:.2f}" if "bleu" in r else "-")
    (console or Console()).print(table)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    model: Path = typer.Option(..., help="RWKV-5.2 checkpoint (.pth)."),
    data: Path = typer.Option(..., help="TokenDataset .pt (e.g. the validation split)."),
    state: Path | None = typer.Option(None, help="State-tuned file (blocks.N.att.time_state): also evaluated from it."),
    ctx_len: int = typer.Option(256, help="Tokens per forward call (the state carries across calls)."),
    batch_size: int = typer.Option(8, help="Dialogues per batch."),
    all_tokens: bool = typer.Option(False, "--all-tokens", help="Count every token, not only the assistant's."),
    stream: bool = typer.Option(False, help="One text, state carried across dialogues, instead of per dialogue."),
    bleu_limit: int = typer.Option(100, help="Replies generated for BLEU (0: no BLEU)."),
    max_new_tokens: int = typer.Option(64, help="Longest generated reply."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="Inference dtype: fp32, bf16 or fp16."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Perplexity and BLEU of a model on a dataset, from the zero state and optionally from a tuned state."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    net = RWKV5.from_checkpoint(model, device=device, dtype=dtypes[dtype])
    ds = TokenDataset.load(data)
    from worker.tokenizer import WorldTokenizer  # the serving tokenizer: replies decode as the service would

    tokenizer = WorldTokenizer()
    starts: dict[str, State | None] = {"zero state": None}
    if state is not None:
        c = net.config
        starts[f"tuned state ({state.name})"] = load_time_state(state, c.n_layer, c.n_head, c.head_size, c.n_embd)
    rows = {name: evaluate(net, ds, tokenizer, init, ctx_len=ctx_len, batch_size=batch_size, masked=not all_tokens,
                           stream=stream, bleu_limit=bleu_limit, max_new_tokens=max_new_tokens)
            for name, init in starts.items()}
    print_table(rows, f"{model.name} on {data.name}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": str(model), "data": str(data), "state": str(state) if state else None,
                                        "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    app()
