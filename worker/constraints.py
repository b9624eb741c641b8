"""Structured output: a turn's response_format (JSON schema, regex, Lark grammar) as a token mask at every step.

llguidance compiles a response_format against the worker's vocabulary (built once, from the tokenizer's bytes per
id) into a matcher: the set of tokens that may come next, given the tokens so far. Compiling costs about a
millisecond for a typical schema, so pristine matchers are cached by content (a bounded LRU) and each turn gets
its own copy. Per step, the batch runner asks `MaskFiller` for the bitmask rows of the constrained turns that
sample: llguidance fills them in its own threads (GIL released) while the model's forward runs, since a mask
depends only on the tokens already consumed; the sampler then sets every disallowed logit to -inf before its
usual penalties/temperature/top-p/top-k. The scheduler feeds each sampled token to its turn's matcher
(`TurnConstraint.advance`), and ends the turn with CONSTRAINT_COMPLETE once the grammar is complete.

A bad schema, regex or grammar is InvalidArgument carrying the compiler's message. See docs/structured_output.md.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from common.errors import InvalidArgument
from common.sampling import check_response_format
from rwkv_serve.contract import MAX_RESPONSE_FORMAT_BYTES

# JSON is written compact ({"a":1,"b":[2]}): a model may not pad it with whitespace (with flexible whitespace an
# untrained or wandering model can spend every token on blanks). A schema's own "x-guidance" options override this.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ConstraintLimits:
    """What one response_format may cost to compile and to follow (worker settings RWKV_WORKER_CONSTRAINT_*)."""

    max_bytes: int = MAX_RESPONSE_FORMAT_BYTES  # the schema / regex / grammar text, UTF-8
    lexer_fuel: int = 1_000_000  # llguidance initial_lexer_fuel: the compile's regex work (~50k units per ms)
    step_fuel: int = 200_000  # llguidance step_lexer_fuel: one mask's lexer work (~14k units per ms)
    max_grammar_size: int = 500_000  # llguidance max_grammar_size: symbols in the compiled productions
    cache_size: int = 256  # compiled response_formats kept (LRU)
    threads: int | None = None  # llguidance's mask threads; None = its default (80% of the CPUs, at most 32)


class _VocabBytes:
    """What llguidance.TokenizerWrapper reads from a tokenizer: every id's bytes, the EOS id, an encoder."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = None
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(tokenizer.vocab_size):
            try:
                data = tokenizer.token_bytes(i)
            except ValueError:  # an id the vocab file leaves undefined: a special token no grammar names
                data = b""
            if i == self.eos_token_id or not data:
                special.append(i)
                data = b"\xff[EOS]" if i == self.eos_token_id else b"\xff[unused %d]" % i  # llguidance: 0xFF = special
            tokens.append(data)
        self.tokens = tokens
        self.special_token_ids = special
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            return self._tokenizer.encode_bytes(text)
        return self._tokenizer.encode(text)


class TurnConstraint:
    """One turn's matcher: which tokens may come next; advanced by the engine thread with each sampled token."""

    __slots__ = ("matcher", "eos_id", "complete")

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int) -> None:
        self.matcher = matcher
        self.eos_id = eos_id
        self.complete = False

    def advance(self, token_id: int) -> bool:
        """Consumes a sampled token; True once the output is complete (EOS sampled where the grammar allowed it,
        or nothing more may follow). InvalidArgument for a token the grammar does not allow (only possible when
        banned_tokens removed every token the grammar allowed at that point)."""
        if token_id == self.eos_id:  # only ever allowed where the grammar accepts: the end
            self.complete = True
            return True
        if not self.matcher.consume_token(token_id):
            raise InvalidArgument(f"token {token_id} does not satisfy the turn's response_format (do banned_tokens "
                                  f"remove every token it allows here?): {self.matcher.get_error() or 'rejected'}")
        self.complete = self.matcher.is_stopped()
        return self.complete


class ConstraintCompiler:
    """One per worker: the vocabulary as llguidance sees it, and compiled response_formats cached by content."""

    def __init__(self, tokenizer: Any, limits: ConstraintLimits | None = None) -> None:
        self.limits = limits or ConstraintLimits()
        self.eos_id = tokenizer.eos_id
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_VocabBytes(tokenizer)))
        self.vocab_size = self.lltokenizer.vocab_size
        lim = self.limits
        self._parser_limits = llguidance.LLParserLimits(
            initial_lexer_fuel=lim.lexer_fuel, step_lexer_fuel=lim.step_fuel, max_grammar_size=lim.max_grammar_size,
            verbose_errors=False)
        self.executor = llguidance.LLExecutor(lim.threads)
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def grammar(kind: str, text: str) -> str:
        """The llguidance grammar of one response_format (not yet checked)."""
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        return llguidance.LLMatcher.grammar_from_lark(text)

    def compile(self, response_format: Mapping[str, Any]) -> TurnConstraint:
        """A fresh constraint for one turn; InvalidArgument with the compiler's message when it does not compile."""
        kind, text = check_response_format(response_format, self.limits.max_bytes)
        key = (kind, text)
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return TurnConstraint(pristine.deep_copy(), self.eos_id)
        try:
            grammar = self.grammar(kind, text)
        except ValueError as exc:  # llguidance's own JSON parse of the schema
            raise InvalidArgument(f"response_format {kind} does not compile: {exc}") from None
        # The constructor drops the GIL while it builds the lexer; an error leaves the matcher in its error state.
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=self._parser_limits)
        if matcher.is_error():
            raise InvalidArgument(f"response_format {kind} does not compile: {matcher.get_error()}")
        with self._lock:
            self.misses += 1
            self._cache[key] = matcher
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return TurnConstraint(matcher.deep_copy(), self.eos_id)

    def grammar_text_of(self, response_format: Mapping[str, Any]) -> str:
        """The llguidance grammar a response_format compiles from (for logs and tests)."""
        kind, text = check_response_format(response_format, self.limits.max_bytes)
        return self.grammar(kind, text)


class PendingMask:
    """Bitmask rows being filled for one step (one row per constrained sampling turn, in `order`)."""

    def __init__(self, order: Sequence[int], bits: torch.Tensor, future: Future[None] | None) -> None:
        self.row_of = {key: i for i, key in enumerate(order)}  # id(TurnConstraint) -> bitmask row
        self._bits = bits
        self._future = future

    def wait(self) -> None:
        """Until the fill is done (it ran beside the forward: usually already); re-raises its error."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def rows(self, constraints: Sequence[TurnConstraint | None], device: torch.device) -> tuple | None:
        """(batch rows, their bitmask rows on `device`) for the constrained entries of one sampling call."""
        batch_rows = [r for r, c in enumerate(constraints) if c is not None]
        if not batch_rows:
            return None
        self.wait()
        index = [self.row_of[id(constraints[r])] for r in batch_rows]
        bits = self._bits[index] if index != list(range(len(self._bits))) else self._bits
        rows = torch.tensor(batch_rows, dtype=torch.long)
        return rows.to(device, non_blocking=True), bits.to(device, non_blocking=True)


class MaskFiller:
    """Starts each step's bitmask fill in llguidance's threads, so that it runs while the forward pass does."""

    def __init__(self, compiler: ConstraintCompiler) -> None:
        self.compiler = compiler
        self.words = (compiler.vocab_size + 31) // 32  # int32 words per bitmask row
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-mask")
        self._buffers: list[torch.Tensor] = []  # two, alternating: a step's rows are read while the next fills
        self._turn = 0

    def _buffer(self, n: int) -> torch.Tensor:
        self._turn ^= 1
        while len(self._buffers) < 2:
            self._buffers.append(torch.empty(0, self.words, dtype=torch.int32))
        buf = self._buffers[self._turn]
        if buf.shape[0] < n:
            buf = torch.empty(max(n, 2 * buf.shape[0]), self.words, dtype=torch.int32,
                              pin_memory=torch.cuda.is_available())
            self._buffers[self._turn] = buf
        return buf[:n]

    def start(self, constraints: Sequence[TurnConstraint]) -> PendingMask:
        """Fills one bitmask row per constraint, in the background (call before the step's forwards)."""
        bits = self._buffer(len(constraints))
        jobs = [(c.matcher, i) for i, c in enumerate(constraints)]
        executor = self.compiler.executor

        def fill() -> None:
            executor.unsafe_compute_mask_ptr(jobs, bits.data_ptr(), self.words * 4, bits.shape[0])

        return PendingMask([id(c) for c in constraints], bits, self._pool.submit(fill))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
