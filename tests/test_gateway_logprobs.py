"""Logprobs with token bytes end to end: the worker fills TokenLogprob/TopLogprob.token_bytes from its tokenizer, the
front relays them, the SDK exposes them, and the gateway maps them to OpenAI's shapes (chat completions'
logprobs.content, completions' legacy logprobs, the Responses API's output_text logprobs), streamed and not, n > 1
too; driven by the official openai SDK against a real worker, front and gateway (tiny random model)."""

from __future__ import annotations

import math

import openai
import pytest

from rwkv_serve_client import RWKVClient, TextDelta
from tests.test_gateway_support import MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [{"role": "user", "content": "Tell me a story about a cat."}]


def _joined(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def _check_covers(entries, reply: str, finish_reason: str) -> None:
    """The entries' bytes are the reply's UTF-8 bytes; only where a stop string ended the reply inside the last
    token may that token's bytes run on past it."""
    joined, text = _joined(entries), reply.encode("utf-8")
    assert joined == text or (finish_reason == "stop" and joined.startswith(text)
                              and len(joined) - len(text) < len(entries[-1].bytes)), (joined, text)


def _check_greedy(entries, top: int) -> None:
    assert entries, "the reply has tokens"
    for e in entries:
        assert len(e.top_logprobs) == top
        best = e.top_logprobs[0]
        # Greedy: the chosen token is the most likely one, with its logprob and bytes.
        assert e.logprob == pytest.approx(best.logprob, abs=1e-5) and e.bytes == best.bytes and e.token == best.token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
    total = sum(e.logprob for e in entries)
    assert math.isfinite(total) and total < 0


def test_chat_logprobs_are_the_greedy_tokens_with_their_bytes(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=5)
    choice = done.choices[0]
    entries = choice.logprobs.content
    _check_greedy(entries, 5)
    _check_covers(entries, choice.message.content, choice.finish_reason)
    assert len(entries) <= done.usage.completion_tokens  # (the tokens of a stop string are not the reply's)
    plain = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    chosen_only = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12,
                                              logprobs=True)
    assert [e.top_logprobs for e in chosen_only.choices[0].logprobs.content] == [[]] * len(entries)
    assert [e.logprob for e in chosen_only.choices[0].logprobs.content] == [e.logprob for e in entries]


def test_streamed_chat_logprobs_equal_the_whole_ones(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12,
                                        logprobs=True, top_logprobs=3)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes, e.logprob) for e in streamed] == \
        [(e.token, e.bytes, e.logprob) for e in whole.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_n_choices_carry_their_own_logprobs_streamed_and_not(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=CONVERSATION, temperature=1.0, max_tokens=10, n=2, seed=7, logprobs=True,
                top_logprobs=2)
    whole = oai.chat.completions.create(**args)
    assert len({c.message.content for c in whole.choices}) == 2
    for choice in whole.choices:
        entries = choice.logprobs.content
        assert entries and all(e.logprob <= e.top_logprobs[0].logprob + 1e-5 for e in entries)
        assert all(math.isfinite(e.logprob) and e.logprob <= 0 for e in entries)
        _check_covers(entries, choice.message.content, choice.finish_reason)
    streamed: dict[int, list] = {0: [], 1: []}
    for c in oai.chat.completions.create(**args, stream=True):
        for choice in c.choices:
            streamed[choice.index] += choice.logprobs.content if choice.logprobs else []
    for choice in whole.choices:
        assert [e.bytes for e in streamed[choice.index]] == [e.bytes for e in choice.logprobs.content]


def test_completion_legacy_logprobs_streamed_and_not(oai: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    done = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, logprobs=3)
    lp = done.choices[0].logprobs
    assert lp.tokens and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)  # greedy: the chosen token is the top one
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    text = done.choices[0].text
    assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens) if "\ufffd" not in t)
    assert math.isfinite(sum(lp.token_logprobs)) and sum(lp.token_logprobs) < 0
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, logprobs=3,
                                         stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    with pytest.raises(openai.BadRequestError) as echo:
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logprobs=1, echo=True)
    assert echo.value.body["param"] == "echo"


def test_responses_output_text_logprobs(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, input="Tell me a story about a cat.", temperature=0, max_output_tokens=10,
                include=["message.output_text.logprobs"], top_logprobs=2, store=False)
    done = oai.responses.create(**args)
    part = done.output[0].content[0]
    _check_greedy(part.logprobs, 2)
    _check_covers(part.logprobs, part.text, "stop")
    events = list(oai.responses.create(**args, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [x.token for e in deltas for x in e.logprobs] == [x.token for x in part.logprobs]
    final = next(e for e in events if e.type == "response.output_text.done")
    assert [x.logprob for x in final.logprobs] == [x.logprob for x in part.logprobs]
    assert oai.responses.create(**{**args, "include": None, "top_logprobs": None}).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as bad:
        oai.responses.create(**{**args, "top_logprobs": 21})
    assert bad.value.body["param"] == "top_logprobs"


def test_grpc_token_bytes_are_the_tokenizers(service, tokenizer) -> None:
    def known(token_id: int) -> bytes:
        return tokenizer.token_bytes(token_id) if 0 <= token_id < tokenizer.vocab_size else b""

    with RWKVClient(service.target) as rwkv:
        result = rwkv.complete("The capital of France is", model=MODEL, temperature=0, max_tokens=8, logprobs=4,
                               return_token_ids=True, stop_token_ids=[])
        assert [lp.token_id for lp in result.logprobs] == result.token_ids and len(result.token_ids) == 8
        for lp in result.logprobs:
            assert lp.token_bytes == tokenizer.token_bytes(lp.token_id) and len(lp.top) == 4
            assert lp.top_bytes == [known(t) for t, _ in lp.top]
        assert b"".join(lp.token_bytes for lp in result.logprobs) == tokenizer.decode_bytes(result.token_ids)
        # Streamed, the deltas are TextDelta events carrying them, those whose text is held back too.
        deltas = [e for e in rwkv.generate("The capital of France is", model=MODEL, temperature=0, max_tokens=8,
                                           logprobs=1, return_token_ids=True, stop_token_ids=[])
                  if isinstance(e, TextDelta)]
        assert [lp.token_id for d in deltas for lp in d.logprobs] == result.token_ids
        assert "".join(d.text for d in deltas) == result.text


def test_entries_go_out_with_the_text_that_completes_their_tokens(tokenizer) -> None:
    """The gateway's alignment on real vocabulary tokens: a token that is part of a character goes out with the
    delta that completes it, a stop string's tokens (whose text the worker never sends) are not the reply's, and
    one that begins in the reply and runs into the stop string is."""
    from gateway.logprobs import Aligner, LegacyLogprobs, aligned
    from rwkv_serve_client import TokenLogprob
    from worker.tokenizer import IncrementalDecoder

    pieces = [b"Hi", b"\xe7", b"\xbb", b"\xbf", b" ok", b"\n", b"\n"]  # "绿" in three one-byte tokens
    ids = [tokenizer.encode_bytes(p)[0] for p in pieces]
    assert [tokenizer.token_bytes(i) for i in ids] == pieces
    entries = [TokenLogprob(i, -0.5, [], tokenizer.token_bytes(i)) for i in ids]
    decoder, aligner, out = IncrementalDecoder(tokenizer), Aligner(), []
    for token_id, entry in zip(ids[:5], entries[:5]):  # "\n\n" is the stop string: its text is held, then dropped
        text = decoder.push(token_id)
        out.append((text, [e.token_bytes for e in aligner.push(text, [entry])]))
    for entry in entries[5:]:
        out.append(("", [e.token_bytes for e in aligner.push("", [entry])]))
    assert out == [("Hi", [b"Hi"]), ("", []), ("", []), ("绿", pieces[1:4]), (" ok", [b" ok"]), ("", []), ("", [])]
    assert aligner.finish() == []  # the stop string's tokens are dropped
    straddling = TokenLogprob(0, -1.0, [], b"k\n\n")
    assert [e.token_bytes for e in aligned("Hiok", [*entries[:1], TokenLogprob(0, -1.0, [], b"o"), straddling])] \
        == [b"Hi", b"o", b"k\n\n"]
    legacy = LegacyLogprobs(0).shape(entries[:5])
    assert legacy["text_offset"] == [0, 2, 2, 2, 3] and legacy["top_logprobs"] is None
    assert legacy["tokens"][1] == "\ufffd"  # a partial character's token as text; its exact bytes are in `bytes`
