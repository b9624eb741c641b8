"""Tokenizers for the worker: the RWKV World vocab (exact greedy longest match), HF tokenizer.json, streaming decode.

Which World encoder runs, and why (measured on this 2-core CPU, ~1 MB mixed corpus, see
bench/results/tokenizer.json):

- The pure-Python path compiles the vocab trie into ONE regular expression (each trie node becomes an
  alternation of its children, with an empty alternative when the node is itself a token) and lets the C
  regex engine do the walk: backtracking out of a dead branch falls back to the deepest token on the path,
  which is exactly greedy longest match. It reads the vocab file it is given, handles any bytes
  (encode_bytes), and runs about 3x as fast as the reference pure-Python trie (10.5 vs 3.1 MB/s
  on the least contended run; the ratio held at 3x under heavy load too).
- `pyrwkv_tokenizer` (Rust) is 4x faster again (44 MB/s), but it only encodes `str`, panics on bad UTF-8
  in decode, silently stops at a byte it cannot match, and its vocab parser only understands bytes
  literals written as all-`\\xNN`. So it is used for `encode(str)` only after checking, per loaded file,
  that it read that same file into the same table (see `_RustEncoder.verify`); otherwise, and for
  everything else, the pure-Python path runs. Both give identical ids; the tests compare both with the
  reference `TRIE_TOKENIZER`.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "WorldTokenizer",
    "HFTokenizer",
    "IncrementalDecoder",
    "load_tokenizer",
    "default_world_vocab_path",
]

_DEFAULT_VOCAB_NAME = "rwkv_vocab_v20230424.txt"


def default_world_vocab_path() -> Path:
    """Path of the World vocab file shipped in the `rwkv` wheel."""
    # find_spec locates the package without executing it: importing rwkv.utils would put the rwkv folder
    # on sys.path and shadow other packages (see RWKV5_NOTES.md).
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'rwkv' package is not installed; pass a vocab file path explicitly")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _DEFAULT_VOCAB_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_DEFAULT_VOCAB_NAME} not found in the installed 'rwkv' package")


_HEX_ONLY_BYTES = re.compile(r"""b(['"])(?:\\x[0-9a-fA-F]{2})+\1""")


def _parse_vocab(path: Path) -> tuple[dict[int, bytes], bool]:
    """Read `id <str or bytes literal> <byte length>` lines into id -> bytes.

    Also says whether every bytes literal is a plain run of \\xNN escapes, the only form the Rust parser reads
    (anything else makes it panic, which prints a Rust backtrace, so we do not even try).
    """
    id_to_bytes: dict[int, bytes] = {}
    hex_only = True
    # Decode ourselves and split on any line ending: the shipped file has CRLF endings.
    text = path.read_bytes().decode("utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            first = line.index(" ")
            last = line.rindex(" ")
            token_id = int(line[:first])
            source = line[first + 1 : last]
            literal = ast.literal_eval(source)
            length = int(line[last + 1 :])
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{path}:{lineno}: cannot parse vocab line {line!r}") from exc
        if isinstance(literal, str):
            token = literal.encode("utf-8")
        elif isinstance(literal, bytes):
            token = literal
            hex_only = hex_only and _HEX_ONLY_BYTES.fullmatch(source.strip()) is not None
        else:
            raise ValueError(f"{path}:{lineno}: token must be a str or bytes literal, got {type(literal).__name__}")
        if len(token) != length:
            raise ValueError(f"{path}:{lineno}: token {literal!r} is {len(token)} bytes, the line says {length}")
        if not token:
            raise ValueError(f"{path}:{lineno}: empty token")
        if token_id <= 0:
            raise ValueError(f"{path}:{lineno}: id {token_id} is reserved (0 = end of text) or negative")
        if token_id in id_to_bytes:
            raise ValueError(f"{path}:{lineno}: duplicate id {token_id}")
        id_to_bytes[token_id] = token
    if not id_to_bytes:
        raise ValueError(f"{path}: no tokens")
    return id_to_bytes, hex_only


def _compile_longest_match(tokens: Iterable[bytes]) -> re.Pattern[bytes]:
    """One regex whose leftmost match at any position is the longest vocab token starting there."""
    # Trie as nested dicts; the key None marks "a token ends here".
    root: dict = {}
    for token in tokens:
        node = root
        for byte in token:
            node = node.setdefault(byte, {})
        node[None] = True

    def pattern(node: dict) -> tuple[bytes, int]:
        """(regex for the tokens below `node`, how many tokens that is)."""
        branches: list[tuple[int, bytes]] = []
        leaves: list[int] = []
        for byte, child in node.items():
            if byte is None:
                continue
            if len(child) == 1 and None in child:
                leaves.append(byte)  # a token with no longer continuation: fold into one character class
            else:
                sub, size = pattern(child)
                branches.append((size, re.escape(bytes([byte])) + sub))
        # The regex engine tries alternatives in order and they all start with distinct bytes, so the order
        # only matters for speed: busy subtrees (common prefixes) first.
        branches.sort(key=lambda b: -b[0])
        alternatives = [p for _, p in branches]
        if leaves:
            cls = b"".join(re.escape(bytes([b])) for b in sorted(leaves))
            alternatives.append(cls if len(leaves) == 1 else b"[" + cls + b"]")
        count = sum(size for size, _ in branches) + len(leaves) + (1 if None in node else 0)
        if None in node:
            alternatives.append(b"")  # last: fall back to the token ending at this node
        if len(alternatives) == 1:
            return alternatives[0], count  # no '|' at its top level, so it concatenates without a group
        return b"(?:" + b"|".join(alternatives) + b")", count

    return re.compile(pattern(root)[0], re.DOTALL)


class _RustEncoder:
    """`pyrwkv_tokenizer` bound to one vocab file, used only once it is shown to agree with our table."""

    def __init__(self, path: Path) -> None:
        import pyrwkv_tokenizer  # noqa: PLC0415 - optional dependency

        self._impl = pyrwkv_tokenizer.WorldTokenizer(str(path))

    def encode(self, text: str) -> list[int]:
        return self._impl.encode(text)

    def verify(self, id_to_bytes: dict[int, bytes], probe: str, expected: list[int]) -> bool:
        """True when the Rust side read the same table as we did and encodes the probe identically."""
        max_id = max(id_to_bytes)
        # Rust keeps tokens in a list indexed by file position and reports get_vocab by that index, so ids
        # must be exactly 1..N; it also silently stops at a byte no token covers, so every byte must be a token.
        if sorted(id_to_bytes) != list(range(1, max_id + 1)) or self._impl.vocab_size() != max_id + 1:
            return False
        singles = {t for t in id_to_bytes.values() if len(t) == 1}
        if len(singles) != 256:
            return False
        vocab = self._impl.get_vocab()
        text_tokens: dict[str, int] = {}
        for token_id, token in id_to_bytes.items():
            try:
                text_tokens[token.decode("utf-8")] = token_id
            except UnicodeDecodeError:
                # Not in Rust's map (it lists them all under one placeholder). We only get here when every
                # bytes literal is a pure \xNN run (see _parse_vocab), which Rust's hex parser reads exactly.
                continue
        for text, token_id in text_tokens.items():
            # Both maps keep the later line for duplicate texts; Rust's NUL placeholder at position 0 is
            # overwritten by id 1 when the file defines '\x00', as the World vocab does.
            if vocab.get(text) != token_id:
                return False
        return self._impl.encode(probe) == expected


def _probe_text(id_to_bytes: dict[int, bytes]) -> str:
    """A few kilobytes that touch multi-byte characters, whitespace runs and the longest tokens."""
    longest = sorted(id_to_bytes.values(), key=len, reverse=True)[:50]
    parts = [t.decode("utf-8", "replace") for t in longest]
    parts += [
        "Hello world!\n\n  \t x = 1\r\n",
        "中文，日本語のテキスト、한국어 😀🎉👍🏽 ∑∫√ Ωμ ñ é ü ß ø",
        "\x00\x01\x7f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
        " " * 300 + "\n" * 40 + "#" * 90,
    ]
    return "".join(parts) * 3


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest byte match over a vocab file, id 0 = end of text."""

    def __init__(self, vocab_path: str | Path | None = None, *, use_rust: bool = True) -> None:
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_world_vocab_path()
        id_to_bytes, rust_readable = _parse_vocab(self.vocab_path)
        self._vocab_size = max(id_to_bytes) + 1
        # Dense id -> bytes table for decode; None marks ids the file does not define. Id 0 (end of text)
        # decodes to nothing, so a stream that lets it through prints no stray byte.
        table: list[bytes | None] = [None] * self._vocab_size
        table[0] = b""
        for token_id, token in id_to_bytes.items():
            table[token_id] = token
        self._id_to_bytes = table
        # File order, so that as in the reference the later line wins when two ids share the same bytes.
        self._bytes_to_id: dict[bytes, int] = {token: i for i, token in id_to_bytes.items()}
        self._regex = _compile_longest_match(self._bytes_to_id)
        # With every single byte a token (as in the World vocab) every position starts a match.
        self._all_bytes_covered = sum(1 for t in self._bytes_to_id if len(t) == 1) == 256
        self._rust: _RustEncoder | None = None
        if use_rust and rust_readable:
            self._rust = self._try_rust(id_to_bytes)

    def _try_rust(self, id_to_bytes: dict[int, bytes]) -> _RustEncoder | None:
        try:
            rust = _RustEncoder(self.vocab_path)
            probe = _probe_text(id_to_bytes)
            ok = rust.verify(id_to_bytes, probe, self._encode_python(probe.encode("utf-8")))
        except ImportError:
            return None
        except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return None
        return rust if ok else None

    @property
    def backend(self) -> str:
        """'rust' when encode(str) runs in pyrwkv_tokenizer, else 'python'."""
        return "rust" if self._rust is not None else "python"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return 0

    def _encode_python(self, data: bytes) -> list[int]:
        if not self._all_bytes_covered:
            self._check_covered(data)
        return list(map(self._bytes_to_id.__getitem__, self._regex.findall(data)))

    def _check_covered(self, data: bytes) -> None:
        """Raise on the first byte no token starts with (findall would silently skip it)."""
        pos = 0
        for match in self._regex.finditer(data):
            if match.start() != pos:
                break
            pos = match.end()
        if pos != len(data):
            raise ValueError(
                f"byte {data[pos]:#04x} at offset {pos} is not covered by any token in {self.vocab_path}"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (UTF-8), greedy longest match."""
        if self._rust is not None:
            return self._rust.encode(text)
        return self._encode_python(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes, which need not be valid UTF-8."""
        return self._encode_python(bytes(data))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b'' for end of text)."""
        if 0 <= token_id < self._vocab_size:
            token = self._id_to_bytes[token_id]
            if token is not None:
                return token
        raise ValueError(f"unknown token id {token_id} (vocab size {self._vocab_size})")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated bytes of `ids`."""
        table = self._id_to_bytes
        try:
            if ids and min(ids) < 0:  # a negative index would silently wrap around the table
                raise IndexError
            return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except (IndexError, TypeError):  # out of range, or a gap in the file's ids (None)
            for i in ids:
                self.token_bytes(i)  # raises, naming the id
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizer.json` behind the same interface as WorldTokenizer."""

    def __init__(self, path: str | Path, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer  # noqa: PLC0415 - only needed for HF models

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            eos_id = self._guess_eos()
        if not 0 <= eos_id < self._vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocab (size {self._vocab_size})")
        self._eos_id = eos_id
        self._byte_level = self._is_byte_level()
        self._byte_decoder = _gpt2_unicode_to_byte() if self._byte_level else {}

    def _guess_eos(self) -> int:
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>"):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return 0

    def _is_byte_level(self) -> bool:
        spec = json.loads(self._tok.to_str())
        decoder = spec.get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        return "ByteLevel" in kinds

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added special tokens (the prompt format adds its own)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """HF tokenizers take text only: bytes are decoded with U+FFFD for invalid UTF-8."""
        return self.encode(bytes(data).decode("utf-8", errors="replace"))

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token: exact for byte-level BPE and <0xNN> byte-fallback pieces, else its UTF-8 text."""
        token = self._tok.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None
        if token is None:
            raise ValueError(f"unknown token id {token_id} (vocab size {self._vocab_size})")
        if self._byte_level and all(ch in self._byte_decoder for ch in token):
            return bytes(self._byte_decoder[ch] for ch in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("\u2581", " ").encode("utf-8")  # SentencePiece marks spaces with U+2581

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated token bytes (see token_bytes for how exact that is)."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` through the tokenizer's own decoder (byte-level BPE: plain byte concatenation)."""
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"unknown token id {i} (vocab size {self._vocab_size})")
        if self._byte_level:
            # Byte-level decoding is plain byte concatenation; doing it here keeps decode consistent with
            # IncrementalDecoder (same U+FFFD placement as bytes.decode(errors='replace')).
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def load_tokenizer(path: str | Path | None) -> WorldTokenizer | HFTokenizer:
    """None -> the World vocab; `*.json` -> HFTokenizer; `*.txt` -> WorldTokenizer(path)."""
    if path is None:
        return WorldTokenizer()
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".json":
        return HFTokenizer(p)
    if suffix == ".txt":
        return WorldTokenizer(p)
    raise ValueError(f"unsupported tokenizer file {p}: expected a World vocab .txt or a HF tokenizer .json")


class IncrementalDecoder:
    """Streams token ids to text, holding back bytes until they form complete UTF-8 characters."""

    def __init__(self, tokenizer: WorldTokenizer | HFTokenizer) -> None:
        self._tokenizer = tokenizer
        # The stdlib incremental decoder applies the same "maximal invalid subpart -> one U+FFFD" rule as
        # bytes.decode(errors='replace'), so the streamed text concatenates to exactly what decode() gives.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still partial)."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for an unfinished character; the decoder is then empty."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while bytes are held back."""
        return bool(self._decoder.getstate()[0])
