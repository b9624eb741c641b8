"""Structured output in the engine: a random-init model sampling at temperature 1 under JSON schema, regex and Lark
constraints gives only outputs that parse and validate (gibberish weights can only do that through the mask);
unconstrained neighbours are unaffected; bad formats are InvalidArgument with the compiler's message."""

from __future__ import annotations

import json
import math
import re

import jsonschema  # installed with the dev extra (kubernetes-validate depends on it)
import pytest
import torch

from common.errors import InvalidArgument
from worker.engine import Delta, Engine, Finished, StopReason, TurnRequest
from worker.sampler import SamplerState, SamplingParams, _apply_bitmask, sample_batch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "User: tell me about a person\n\nAssistant:"

# Strings are bounded (maxLength, patterns, enums): a random model almost never picks the closing quote among the
# ~65k tokens a free string allows, so an unbounded string would run to max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 1,
                 "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "verified": {"type": "boolean"}},
            "required": ["zip", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^ord-[0-9a-f]{4}$"},
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"enum": ["A1", "B2", "C3"]}, "qty": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"},
    },
    "required": ["id", "items", "express"],
    "additionalProperties": False,
}
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)", r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}"]
# Nested lists of small numbers, two levels deep at most: valid JSON, checked by json.loads + a shape check.
LARK_LISTS = r"""
start: outer
outer: "[" (inner ("," inner)*)? "]"
inner: "[" (NUM ("," NUM)*)? "]" | NUM
NUM: /[0-9]{1,3}/
"""


def run_all(engine: Engine, requests: list[TurnRequest]) -> list[tuple[str, list[int], Finished]]:
    """Submits every request, steps until idle; (text, token ids, Finished) per request, in order."""
    turns = [engine.submit(r) for r in requests]
    events: dict[int, list] = {}
    while not engine.idle:
        for turn, event in engine.step_sync():
            events.setdefault(turn.id, []).append(event)
    out = []
    for turn in turns:
        evs = events[turn.id]
        assert isinstance(evs[-1], Finished), evs[-1]
        deltas = [e for e in evs if isinstance(e, Delta)]
        out.append(("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], evs[-1]))
    return out


def request(tokenizer, fmt: dict | None, seed: int, **params) -> TurnRequest:
    sampling = SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 160, "response_format": fmt,
                                 **params})
    return TurnRequest(tokenizer.encode(PROMPT), sampling)


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer):
    return Engine(tiny_model, tokenizer, max_batch=8)


def test_json_schema_outputs_validate(engine, tokenizer) -> None:
    requests = [request(tokenizer, {"json_schema": schema}, seed) for schema in (PERSON, ORDER) for seed in range(4)]
    results = run_all(engine, requests)
    for (text, _, finished), req in zip(results, requests):
        assert finished.reason is StopReason.CONSTRAINT_COMPLETE, text
        jsonschema.validate(json.loads(text), json.loads(req.params.response_format["json_schema"]))
    assert len({text for text, _, _ in results}) == len(results)  # sampled, not one forced string


def test_regex_outputs_fullmatch(engine, tokenizer) -> None:
    requests = [request(tokenizer, {"regex": rx}, seed) for rx in REGEXES for seed in range(2)]
    for (text, _, finished), req in zip(run_all(engine, requests), requests):
        assert finished.reason in (StopReason.CONSTRAINT_COMPLETE,), text
        assert re.fullmatch(req.params.response_format["regex"], text), text


def test_lark_grammar_outputs_parse(engine, tokenizer) -> None:
    for text, _, finished in run_all(engine, [request(tokenizer, {"lark_grammar": LARK_LISTS}, s) for s in range(4)]):
        assert finished.reason is StopReason.CONSTRAINT_COMPLETE, text
        value = json.loads(text)
        assert isinstance(value, list)
        for item in value:
            assert isinstance(item, int) or all(isinstance(x, int) for x in item)


def test_unconstrained_neighbours_are_unaffected(engine, tokenizer) -> None:
    greedy = [TurnRequest(tokenizer.encode(f"User: question {i}\n\nAssistant:"),
                          SamplingParams(temperature=0, stop_token_ids=(), max_tokens=24)) for i in range(3)]
    sampled = [TurnRequest(tokenizer.encode("User: hi\n\nAssistant:"),
                           SamplingParams(temperature=1.0, top_p=0.5, seed=7, stop_token_ids=(), max_tokens=24))]
    alone = run_all(engine, greedy + sampled)
    constrained = [request(tokenizer, {"json_schema": PERSON}, s) for s in range(3)]
    mixed = run_all(engine, constrained[:2] + greedy + constrained[2:] + sampled)
    assert [tokens for _, tokens, _ in mixed[2:5]] + [mixed[6][1]] == [tokens for _, tokens, _ in alone]
    assert all(f.reason is StopReason.CONSTRAINT_COMPLETE for _, _, f in (mixed[0], mixed[1], mixed[5]))


def test_constrained_turns_ignore_stop_strings_and_tokens_but_keep_max_tokens(engine, tokenizer) -> None:
    # The chat template's "\n\n" and a stop token inside the allowed output cut nothing.
    a_id = tokenizer.encode("a")[0]
    fmt = {"regex": r"a\n\nb\n\nc"}
    (text, _, finished), = run_all(engine, [request(tokenizer, fmt, 1, stop_strings=("\n\n",),
                                                     stop_token_ids=(0, a_id))])
    assert (text, finished.reason) == ("a\n\nb\n\nc", StopReason.CONSTRAINT_COMPLETE)
    (text, tokens, finished), = run_all(engine, [request(tokenizer, {"json_schema": PERSON}, 3, max_tokens=5)])
    assert finished.reason is StopReason.MAX_TOKENS and len(tokens) == 5
    assert text.startswith('{"name":"')  # a prefix of a valid value, incomplete


def test_the_grammar_decides_the_end_even_with_end_of_text_banned(engine, tokenizer) -> None:
    # banned_tokens=(0,) is the chat demo's default; a grammar that may stop or go on needs end-of-text to stop.
    results = run_all(engine, [request(tokenizer, {"regex": r"(ab){1,40}"}, s, banned_tokens=(0,), max_tokens=60)
                               for s in range(3)])
    for text, tokens, finished in results:
        assert re.fullmatch(r"(ab){1,40}", text) and 0 not in tokens
        assert finished.reason in (StopReason.CONSTRAINT_COMPLETE, StopReason.MAX_TOKENS)


def test_logprobs_are_those_of_the_masked_distribution(engine, tokenizer) -> None:
    (text, _, finished), = run_all(engine, [request(tokenizer, {"regex": r"[0-9]{4}"}, 5, logprobs=5)])
    assert re.fullmatch(r"[0-9]{4}", text)
    turn = engine.submit(request(tokenizer, {"regex": r"[0-9]{4}"}, 5, logprobs=5))
    deltas = []
    while not engine.idle:
        deltas += [e for t, e in engine.step_sync() if t is turn and isinstance(e, Delta) and e.logprobs]
    assert deltas
    for d in deltas:
        sample = d.logprobs[0]
        assert math.isfinite(sample.logprob) and sample.logprob <= 0
        finite = [(i, lp) for i, lp in sample.top_logprobs if math.isfinite(lp)]
        assert finite and all(tokenizer.decode([i]).isdigit() for i, _ in finite)
        # The masked distribution sums to 1 over the allowed tokens: the top alternatives' mass is at most 1.
        assert sum(math.exp(lp) for _, lp in finite) <= 1 + 1e-6


def test_a_grammar_that_writes_the_turns_end_is_not_closed_twice(engine, tokenizer) -> None:
    epilogue = tokenizer.encode("\n\n")
    plain, ended = run_all(engine, [
        TurnRequest(tokenizer.encode(PROMPT), SamplingParams(temperature=1.0, seed=1, response_format={"regex": "ok"}),
                    epilogue=epilogue),
        TurnRequest(tokenizer.encode(PROMPT), SamplingParams(temperature=1.0, seed=1,
                                                             response_format={"regex": "ok\n\n"}), epilogue=epilogue),
    ])
    prompt_len = len(tokenizer.encode(PROMPT))
    assert plain[0] == "ok" and plain[2].prompt_tokens == prompt_len + len(epilogue)
    assert ended[0] == "ok\n\n" and ended[2].prompt_tokens == prompt_len
    assert ended[2].tokens_consumed == prompt_len + len(ended[1])


@pytest.mark.parametrize("fmt, message", [
    ({"json_schema": '{"type": "frobnicate"}'}, "frobnicate"),
    ({"json_schema": '{"type": '}, "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "must be a JSON object"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"lark_grammar": "start: missing_rule"}, "missing_rule"),
    ({"lark_grammar": ""}, "non-empty"),
    ({"xml": "<a/>"}, "unknown response_format kind"),
    ({"regex": "a", "json_schema": "{}"}, "exactly one"),
])
def test_bad_formats_are_invalid_argument_with_the_compilers_message(engine, tokenizer, fmt, message) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        engine.submit(request(tokenizer, fmt, 0))
    assert engine.idle


def test_compiled_formats_are_cached_by_content(engine, tokenizer) -> None:
    compiler = engine.constraints
    fmt = {"regex": r"cache-[0-9]{2}"}
    misses, hits = compiler.misses, compiler.hits
    run_all(engine, [request(tokenizer, fmt, s) for s in range(3)])
    assert (compiler.misses - misses, compiler.hits - hits) == (1, 2)
    assert len(compiler._cache) <= compiler.limits.cache_size


def test_limits_are_enforced(tiny_model, tokenizer) -> None:
    from worker.constraints import ConstraintCompiler, ConstraintLimits

    compiler = ConstraintCompiler(tokenizer, ConstraintLimits(max_bytes=64, lexer_fuel=2_000, cache_size=2))
    engine = Engine(tiny_model, tokenizer, constraints=compiler)
    with pytest.raises(InvalidArgument, match="limit is 64"):
        engine.submit(request(tokenizer, {"regex": "a" * 65}, 0))
    with pytest.raises(InvalidArgument, match="too big"):  # the lexer fuel
        compiler.compile({"regex": r"\w{1,40}@\w{1,40}"})
    for i in range(4):
        compiler.compile({"regex": f"x{i}"})
    assert len(compiler._cache) == 2


def test_apply_bitmask_matches_a_per_token_reference() -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 100
    x = torch.randn(4, vocab, generator=g)
    bits = torch.randint(-2**31, 2**31 - 1, (2, (vocab + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([3, 1])
    got = x.clone()
    _apply_bitmask(got, rows, bits)
    want = x.clone()
    for i, r in enumerate(rows.tolist()):
        for j in range(vocab):
            if not (int(bits[i, j // 32]) >> (j % 32)) & 1:
                want[r, j] = -math.inf
    assert torch.equal(got, want)
    # Unmasked rows sample exactly as without a mask.
    states = [SamplerState(SamplingParams(temperature=1.0, seed=s)) for s in range(4)]
    twins = [SamplerState(SamplingParams(temperature=1.0, seed=s)) for s in range(4)]
    masked = sample_batch(x, states, (rows, bits))
    plain = sample_batch(x, twins)
    assert [masked[i].token_id for i in (0, 2)] == [plain[i].token_id for i in (0, 2)]
    for i, r in enumerate(rows.tolist()):
        t = masked[r].token_id
        assert (int(bits[i, t // 32]) >> (t % 32)) & 1


def test_a_hf_tokenizer_vocabulary_compiles_too(tmp_path) -> None:
    from tests.test_tokenizer import _hf_tokenizer_file
    from worker.constraints import ConstraintCompiler
    from worker.tokenizer import HFTokenizer

    hf = HFTokenizer(_hf_tokenizer_file(tmp_path))
    compiler = ConstraintCompiler(hf)
    assert compiler.vocab_size == hf.vocab_size and compiler.eos_id == hf.eos_id
    constraint = compiler.compile({"regex": "hello (world|fox)"})
    ids = hf.encode("hello world")
    assert constraint.matcher.validate_tokens(ids) == len(ids)
    assert [constraint.advance(t) for t in ids][-1] is True  # complete after the last token
    other = compiler.compile({"regex": "hello (world|fox)"})
    bad = hf.encode("hello there")
    assert other.matcher.validate_tokens(bad) < len(bad)


def test_steps_without_constrained_turns_do_no_mask_work(tiny_model, tokenizer) -> None:
    plain = Engine(tiny_model, tokenizer, max_batch=4)
    run_all(plain, [request(tokenizer, None, s, max_tokens=4) for s in range(2)])
    assert plain._constraints is None and plain.batch_runner.masks is None  # never even built

    from worker.constraints import MaskFiller

    class CountingFiller(MaskFiller):
        calls: list[int] = []

        def start(self, constraints):
            self.calls.append(len(constraints))
            return super().start(constraints)

    engine = Engine(tiny_model, tokenizer, max_batch=4)
    engine.batch_runner.masks = CountingFiller(engine.constraints)
    run_all(engine, [request(tokenizer, None, s, max_tokens=4) for s in range(3)])
    assert CountingFiller.calls == [] and engine.scheduler.constrained == 0
    run_all(engine, [request(tokenizer, {"regex": "[0-9]{3}"}, 0), request(tokenizer, None, 1, max_tokens=6)])
    assert CountingFiller.calls and set(CountingFiller.calls) == {1}  # only the constrained row, every step it samples
    assert engine.scheduler.constrained == 0
