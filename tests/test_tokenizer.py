"""World tokenizer against the reference TRIE_TOKENIZER; HF wrapper; streaming decode."""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from worker.tokenizer import (
    HFTokenizer,
    IncrementalDecoder,
    WorldTokenizer,
    default_world_vocab_path,
    load_tokenizer,
)

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_STDLIB_FILES = (
    "argparse.py", "textwrap.py", "difflib.py", "dataclasses.py", "json/decoder.py", "json/encoder.py",
    "string.py", "fractions.py", "statistics.py", "shlex.py", "heapq.py", "bisect.py", "calendar.py",
)
_PARAGRAPHS = (
    "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。"
    "该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。",
    "東京は日本の首都であり、世界最大級の都市圏を形成している。春には桜が咲き、多くの人々が花見を楽しむ。",
    "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐른다. 오늘 날씨가 정말 좋네요!",
    "Москва — столица России, крупнейший по численности населения город страны. Привет, мир!",
    "القاهرة هي عاصمة مصر وأكبر مدنها، وتقع على ضفاف نهر النيل.",
    "Ελλάδα: Η Αθήνα είναι η πρωτεύουσα. Ünïcödé façade naïve café — “quotes” ‘single’ … «ёлка»",
    "User: 你好，请介绍一下你自己。\n\nAssistant: 你好！我是一个由 RWKV 驱动的语言模型。\n\n",
    "<s>User: What is 2+2?</s>\n<s>Assistant: 4</s>",
)
_EMOJI = ("😀", "🎉", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "❤️", "🤖", "✨", "🚀", "🧑🏿‍💻", "☕")


def build_corpus(target_bytes: int = 1_100_000, seed: int = 20230424) -> str:
    """A deterministic mixed corpus of at least `target_bytes` UTF-8 bytes (also used by the benchmark)."""
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_FILES if (stdlib / name).is_file()]
    prose: list[str] = []
    for source in code:  # English prose: the docstrings of the same modules
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    prose.append(doc)
    world = WorldTokenizer(use_rust=False)
    vocab_words = [t.decode("utf-8") for i in range(1, world.vocab_size)
                   if (t := world.token_bytes(i)) and _is_utf8(t)]

    def segment() -> str:
        kind = rng.randrange(9)
        if kind == 0:  # a slice of source code
            src = rng.choice(code)
            start = rng.randrange(len(src))
            return src[start : start + rng.randrange(200, 4000)]
        if kind == 1:
            return rng.choice(prose) + rng.choice(("\n\n", "\n", " ", ""))
        if kind == 2:
            return rng.choice(_PARAGRAPHS)
        if kind == 3:  # real vocab pieces in random order: every script the vocab knows, at token seams
            return "".join(rng.choice(vocab_words) for _ in range(rng.randrange(5, 80)))
        if kind == 4:
            joiners = ("", " ", "\u200d", "!")
            return "".join(rng.choice(_EMOJI) + rng.choice(joiners) for _ in range(rng.randrange(1, 20)))
        if kind == 5:  # whitespace runs, some longer than the longest (128-byte) token
            return "".join(rng.choice((" ", "\n", "\t", "\r\n", "\u3000")) * rng.randrange(1, 300) for _ in range(3))
        if kind == 6:  # random code points from every plane, no surrogates
            return "".join(_random_char(rng) for _ in range(rng.randrange(1, 60)))
        if kind == 7:  # mixed scripts without spaces
            return "".join(rng.choice(rng.choice(_PARAGRAPHS)) for _ in range(rng.randrange(10, 200)))
        numbers = f"{rng.random():.6f} {rng.randrange(10**12)} 0x{rng.randrange(2**32):08X} "
        return numbers + "#" * rng.randrange(1, 200)

    parts: list[str] = []
    size = 0
    while size < target_bytes:
        piece = segment()
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _random_char(rng: random.Random) -> str:
    while True:
        cp = rng.choice((rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                         rng.randrange(0x10000, 0x110000), rng.randrange(0, 0x20)))
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    return default_world_vocab_path()


@pytest.fixture(scope="module")
def ref(vocab_path: Path) -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(vocab_path))


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def py_tok() -> WorldTokenizer:
    return WorldTokenizer(use_rust=False)


@pytest.fixture(scope="module")
def corpus() -> str:
    return build_corpus()


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}: {a[i:i + 5]} vs {b[i:i + 5]} (lengths {len(a)}, {len(b)})"


def test_known_ids(tok: WorldTokenizer, py_tok: WorldTokenizer) -> None:
    for t in (tok, py_tok):
        assert t.encode("<s>") == [61, 116, 63]
        assert t.encode("</s>") == [754, 116, 63]
        assert t.encode("\n\n") == [261]
        assert t.encode("") == []
        assert t.vocab_size == 65530
        assert t.eos_id == 0


def test_rust_fast_path_is_used_for_the_default_vocab(tok: WorldTokenizer) -> None:
    pytest.importorskip("pyrwkv_tokenizer")
    assert tok.backend == "rust"


def test_corpus_identical_to_reference(corpus: str, ref: TRIE_TOKENIZER, tok: WorldTokenizer,
                                       py_tok: WorldTokenizer) -> None:
    data = corpus.encode("utf-8")
    assert len(data) >= 1_000_000
    expected = ref.encodeBytes(data)
    for t in (tok, py_tok):
        got = t.encode(corpus)
        assert got == expected, _first_difference(got, expected)
    assert py_tok.encode_bytes(data) == expected
    assert tok.decode(expected) == corpus


def test_many_short_texts_identical(ref: TRIE_TOKENIZER, tok: WorldTokenizer, py_tok: WorldTokenizer) -> None:
    # Short texts put the start and end of input at every kind of seam.
    corpus = build_corpus(target_bytes=150_000, seed=7)
    rng = random.Random(3)
    for _ in range(1500):
        start = rng.randrange(len(corpus))
        text = corpus[start : start + rng.randrange(1, 40)]
        expected = ref.encode(text)
        assert tok.encode(text) == expected, repr(text)
        assert py_tok.encode(text) == expected, repr(text)


def _broken_utf8_samples() -> list[bytes]:
    rng = random.Random(11)
    good = "中文 emoji 😀 naïve Ωμ текст ".encode("utf-8")
    samples = [
        b"\xff", b"\xfe\xff", b"\x80", b"\xbf\xbf",
        b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",  # overlong forms, an encoded surrogate
        b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", "中".encode()[:2], "😀".encode()[:3], b"abc\xe4\xb8",
        "😀".encode()[1:], b"\x00" * 10, bytes(range(256)), bytes(range(255, -1, -1)),
    ]
    for _ in range(300):
        samples.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    for _ in range(300):  # valid text with bytes cut out or spliced in
        b = bytearray(good * rng.randrange(1, 4))
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(b))
            if rng.random() < 0.5:
                del b[pos]
            else:
                b.insert(pos, rng.randrange(0x80, 0x100))
        samples.append(bytes(b))
    return samples


def test_broken_utf8_identical_to_reference(ref: TRIE_TOKENIZER, tok: WorldTokenizer) -> None:
    for sample in _broken_utf8_samples():
        ids = tok.encode_bytes(sample)
        assert ids == ref.encodeBytes(sample), sample
        assert tok.decode_bytes(ids) == sample
        assert tok.decode(ids) == sample.decode("utf-8", errors="replace")


@HYPOTHESIS
@given(st.text(max_size=200))
def test_any_text_identical_to_reference(ref: TRIE_TOKENIZER, tok: WorldTokenizer, py_tok: WorldTokenizer,
                                         text: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not text; both paths must refuse them
        for t in (tok, py_tok):
            with pytest.raises((UnicodeEncodeError, TypeError, ValueError)):
                t.encode(text)
        return
    expected = ref.encodeBytes(data)
    assert tok.encode(text) == expected
    assert py_tok.encode(text) == expected
    assert tok.decode(expected) == text


@HYPOTHESIS
@given(st.binary(max_size=200))
def test_any_bytes_identical_to_reference(ref: TRIE_TOKENIZER, tok: WorldTokenizer, data: bytes) -> None:
    ids = tok.encode_bytes(data)
    assert ids == ref.encodeBytes(data)
    assert tok.decode_bytes(ids) == data


def test_decode_errors_and_special_ids(tok: WorldTokenizer) -> None:
    assert tok.decode([0]) == "" and tok.token_bytes(0) == b""
    assert tok.token_bytes(261) == b"\n\n"
    assert tok.decode([61, 116, 63, 0]) == "<s>"
    for bad in (65530, 70000, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([61, bad])
        with pytest.raises(ValueError, match=str(bad)):
            tok.token_bytes(bad)
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode_bytes([bad])
    assert tok.decode([0xE4 + 1]) == "\ufffd"  # a lone lead byte decodes with replacement


def _singles() -> list[str]:
    """The 256 single-byte entries written as in the World file: str literals for ASCII, b'\\xNN' above."""
    return [f"{b + 1} {chr(b)!r} 1" if b < 128 else f"{b + 1} b'\\x{b:02x}' 1" for b in range(256)]


def _write_vocab(path: Path, base: Path | None, extra: list[str]) -> Path:
    lines = base.read_bytes().decode("utf-8").splitlines() if base is not None else []
    path.write_bytes(("\r\n".join(lines + extra) + "\r\n").encode("utf-8"))
    return path


def test_custom_vocab_with_special_entries(tmp_path: Path, vocab_path: Path, corpus: str) -> None:
    # The RWKV-Runner style variant: the World vocab plus ids 65530-65533.
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
    path = _write_vocab(tmp_path / "special.txt", vocab_path,
                        [f"{65530 + i} {s!r} {len(s.encode())}" for i, s in enumerate(specials)])
    custom = WorldTokenizer(path)
    reference = TRIE_TOKENIZER(str(path))
    assert custom.vocab_size == 65534
    if _has_rust():
        assert custom.backend == "rust"  # extra ids read from the file are fine for the fast path
    assert custom.encode("<s>") == [65530]
    assert custom.encode("</s>") == [65531]
    text = "<s><|user|>你好</s>\n\n<|assistant|>hi<s</s" + corpus[:100_000]
    assert custom.encode(text) == reference.encode(text)
    assert WorldTokenizer(path, use_rust=False).encode(text) == reference.encode(text)
    assert custom.decode(custom.encode(text)) == text


def _has_rust() -> bool:
    try:
        import pyrwkv_tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    ("extra", "backend"),
    [
        (["257 'hello' 5", "258 ' world' 6", "259 '\\u4e2d\\u6587' 6", "260 b'\\xe4\\xb8' 2", '261 "it\'s" 4'],
         "rust"),
        (["257 'x\\N{BULLET}' 4"], "python"),  # an escape the Rust parser cannot read
        (["257 b'ab\\xff' 3"], "python"),  # a bytes literal that is not a pure \xNN run
        (["257 'hello' 5", "300 'hell' 4"], "python"),  # a gap in the ids (Rust indexes tokens by position)
    ],
)
def test_custom_vocab_backends_agree_with_reference(tmp_path: Path, extra: list[str], backend: str) -> None:
    path = _write_vocab(tmp_path / "small.txt", None, _singles() + extra)
    custom = WorldTokenizer(path)
    reference = TRIE_TOKENIZER(str(path))
    assert custom.backend == (backend if _has_rust() else "python")
    texts = ["hello world hell", "中文中文 it's x•", "ab\xffab", "".join(map(chr, range(300)))]
    for text in texts:
        assert custom.encode(text) == reference.encode(text), text
        assert custom.encode_bytes(text.encode()) == reference.encodeBytes(text.encode())


def test_custom_vocab_with_gaps_and_bytes_tokens(tmp_path: Path) -> None:
    words = ["257 b'ab\\xff' 3", "258 'hello' 5", "259 ' world' 6", "300 'hell' 4", "301 '\\u4e2d\\u6587' 6"]
    path = _write_vocab(tmp_path / "odd.txt", None, _singles() + words)
    custom = WorldTokenizer(path)
    reference = TRIE_TOKENIZER(str(path))
    assert custom.vocab_size == 302
    for data in (b"hello world", b"ab\xffab\xfe", "中文 hell hello".encode(), bytes(range(256))):
        assert custom.encode_bytes(data) == reference.encodeBytes(data)
    assert custom.encode("ab hello") == reference.encode("ab hello")
    with pytest.raises(ValueError, match="260"):
        custom.decode([260])


def test_vocab_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bytes"):
        WorldTokenizer(_write_vocab(tmp_path / "len.txt", None, ["1 'ab' 3"]))
    with pytest.raises(ValueError, match="reserved"):
        WorldTokenizer(_write_vocab(tmp_path / "zero.txt", None, ["0 'a' 1"]))
    with pytest.raises(ValueError, match="duplicate"):
        WorldTokenizer(_write_vocab(tmp_path / "dup.txt", None, ["1 'a' 1", "1 'b' 1"]))
    with pytest.raises(ValueError, match="parse"):
        WorldTokenizer(_write_vocab(tmp_path / "junk.txt", None, ["1 a 1"]))
    partial = WorldTokenizer(_write_vocab(tmp_path / "partial.txt", None, ["1 'a' 1", "2 'ab' 2"]))
    assert partial.encode("aab") == [1, 2]
    with pytest.raises(ValueError, match="0x63"):  # no token covers 'c'
        partial.encode("abc")


def test_load_tokenizer(tmp_path: Path, vocab_path: Path) -> None:
    assert isinstance(load_tokenizer(None), WorldTokenizer)
    small = _write_vocab(tmp_path / "v.txt", None, _singles())
    loaded = load_tokenizer(small)
    assert isinstance(loaded, WorldTokenizer) and loaded.vocab_size == 257
    assert isinstance(load_tokenizer(_hf_tokenizer_file(tmp_path)), HFTokenizer)
    with pytest.raises(ValueError, match="unsupported"):
        load_tokenizer(tmp_path / "model.bin")


def _hf_tokenizer_file(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, the quick brown fox", "中文 text 😀 again and again"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path


def test_hf_tokenizer(tmp_path: Path) -> None:
    path = _hf_tokenizer_file(tmp_path)
    hf = HFTokenizer(path)
    assert hf.eos_id == 0  # <|endoftext|> is the first special token
    assert HFTokenizer(path, eos_id=5).eos_id == 5
    text = "hello 中文 world 😀 unseen Ωμ"
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    assert hf.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(hf.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert hf.encode_bytes(text.encode()) == ids
    with pytest.raises(ValueError, match=str(hf.vocab_size)):
        hf.decode([hf.vocab_size])
    with pytest.raises(ValueError):
        HFTokenizer(path, eos_id=10**6)
    stream = IncrementalDecoder(hf)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_incremental_decoder_holds_partial_characters(tok: WorldTokenizer) -> None:
    stream = IncrementalDecoder(tok)
    zhong = [b + 1 for b in "中".encode()]  # ids 1..256 are the single bytes
    assert [stream.push(i) for i in zhong] == ["", "", "中"]
    assert not stream.pending
    assert stream.push(0xF0 + 1) == "" and stream.pending
    assert stream.push(ord("a") + 1) == "\ufffda"  # the lead byte is now known to be invalid
    assert stream.push(0xE4 + 1) == ""
    assert stream.flush() == "\ufffd" and stream.flush() == ""


# Ids that make UTF-8 trouble: single bytes (ids 1..256) mixed with ordinary tokens.
_ids = st.lists(st.one_of(st.integers(1, 256), st.integers(0, 65529), st.sampled_from([0, 261, 0x80 + 1, 0xE4 + 1])),
                max_size=60)


@HYPOTHESIS
@given(_ids)
def test_incremental_decoder_matches_decode(tok: WorldTokenizer, ids: list[int]) -> None:
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
