"""Fine-tuning data preparation: loaders, chat templates, loss masks, dataset files and windows."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tuning.data import (
    TokenDataset,
    Turn,
    format_dialogue,
    load_cornell,
    load_jsonl,
    load_ubuntu,
    pydoc_dialogues,
    tokenize_dialogue,
    tokenize_dialogues,
)


class GreedyTokenizer:
    """Stand-in for the World tokenizer: bytes are ids 1..256, a few merges above, greedy longest match.

    The merges (": ", "\\n\\n", ...) span the template's segment boundaries on purpose, so a test can see
    that per-segment encoding differs from whole-string encoding the way the real vocab does.
    """

    eos_id = 0
    MERGES = [b": ", b"\n\n", b"User", b"Assistant", b"the", b" the", b"</s>", b"<s>", b"\n\n</s>"]

    def __init__(self) -> None:
        self.vocab = {bytes([b]): b + 1 for b in range(256)}
        self.vocab.update({m: 257 + i for i, m in enumerate(self.MERGES)})
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.longest = max(len(t) for t in self.vocab)

    def encode(self, text: str) -> list[int]:
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                if data[i : i + n] in self.vocab:
                    ids.append(self.vocab[data[i : i + n]])
                    i += n
                    break
        return ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.inverse.get(i, b"") for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tok() -> GreedyTokenizer:
    return GreedyTokenizer()


DIALOGUE = [
    Turn("system", "You are terse."),
    Turn("user", "What is the answer?"),
    Turn("assistant", "It is 42.\n\nTrust me."),
    Turn("user", "Why?"),
    Turn("assistant", "Because."),
]


def _docs(ds: TokenDataset) -> list[list[int]]:
    return [ds.document(i)[0].tolist() for i in range(len(ds))]


def _toy_dataset(tok: GreedyTokenizer, n: int = 40) -> TokenDataset:
    dialogues = [[Turn("user", f"question {i}?"), Turn("assistant", "answer " + "x" * (i % 7))] for i in range(n)]
    return tokenize_dialogues(dialogues, tok, "chat")


# -- loaders ----------------------------------------------------------------------------------------


def test_load_jsonl_both_styles(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        {"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}]},
        {"messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ab"},
        ]},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert list(load_jsonl(path)) == [
        [Turn("user", "hi"), Turn("assistant", "hello")],
        [Turn("system", "be nice"), Turn("user", "ab"), Turn("assistant", "ab")],
    ]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "JSON|Expecting"),
        (json.dumps({"turns": [{"role": "robot", "text": "x"}]}), "unknown role 'robot'"),
        (json.dumps({"messages": [{"role": "user"}]}), "needs 'role' and 'content'"),
        (json.dumps({"dialogue": []}), "'turns' or 'messages'"),
    ],
)
def test_load_jsonl_bad_line_names_line_number(tmp_path: Path, bad: str, fragment: str) -> None:
    good = json.dumps({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*({fragment})"):
        list(load_jsonl(path))


def test_load_cornell(tmp_path: Path) -> None:
    sep = " +++$+++ "
    lines = [
        ("L1", "u0", "m0", "BIANCA", "Où est le café?"),  # latin-1 accents
        ("L2", "u2", "m0", "CAMERON", "Right there."),
        ("L3", "u0", "m0", "BIANCA", "Thanks."),
        ("L10", "u1", "m0", "KAT", "Hi."),
        ("L11", "u3", "m0", "JOEY", "Hey."),
        ("L12", "u1", "m0", "KAT", "Bye."),
        ("L13", "u3", "m0", "JOEY", "Later."),
        ("L20", "u1", "m0", "KAT", ""),  # empty utterance: the real corpus has some
        ("L30", "u1", "m0", "KAT", "Alone."),
    ]
    (tmp_path / "movie_lines.txt").write_bytes(
        "".join(sep.join(f) + "\n" for f in lines).encode("iso-8859-1")
    )
    convs = [
        "u0 +++$+++ u2 +++$+++ m0 +++$+++ ['L1', 'L2', 'L3']",  # odd: trailing user line dropped
        "u1 +++$+++ u3 +++$+++ m0 +++$+++ ['L10', 'L11', 'L12', 'L13']",
        "u1 +++$+++ u3 +++$+++ m0 +++$+++ ['L20', 'L30']",  # starts with a hole: nothing left
        "u1 +++$+++ u3 +++$+++ m0 +++$+++ ['L30', 'L99']",  # unknown id: only one line left
    ]
    (tmp_path / "movie_conversations.txt").write_text("\n".join(convs) + "\n", encoding="iso-8859-1")
    assert list(load_cornell(tmp_path)) == [
        [Turn("user", "Où est le café?"), Turn("assistant", "Right there.")],
        [Turn("user", "Hi."), Turn("assistant", "Hey."), Turn("user", "Bye."), Turn("assistant", "Later.")],
    ]


def test_load_ubuntu_v2_csv(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Context", "Utterance", "Label"])
        w.writerow(["my wifi is down __eou__ any idea ? __eou__ __eot__ which card ? __eou__ __eot__ "
                    "intel , 5300 __eou__ __eot__", "try iwlwifi __eou__", "1.0"])
        w.writerow(["my wifi is down __eou__ __eot__", "i like trains __eou__", "0.0"])  # distractor
        w.writerow(["hi __eou__ __eot__ hello __eou__ __eot__", "what's up __eou__ all good ? __eou__", "1"])
    assert list(load_ubuntu(path)) == [
        [Turn("user", "my wifi is down\nany idea ?"), Turn("assistant", "which card ?"),
         Turn("user", "intel , 5300"), Turn("assistant", "try iwlwifi")],
        # Roles are counted back from the reply, which is always the assistant's.
        [Turn("assistant", "hi"), Turn("user", "hello"), Turn("assistant", "what's up\nall good ?")],
    ]


def test_load_ubuntu_test_csv_and_v1_tsv(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Context", "Ground Truth Utterance", "Distractor_0"])
        w.writerow(["how do i sudo ? __eou__ __eot__", "sudo command __eou__", "bananas __eou__"])
    assert list(load_ubuntu(path)) == [[Turn("user", "how do i sudo ?"), Turn("assistant", "sudo command")]]

    folder = tmp_path / "dialogs" / "3"
    folder.mkdir(parents=True)
    (folder / "1.tsv").write_text(
        "2004-11-23T11:49:00.000Z\tstuNNed\t\tany ideas why java is slow?\n"
        "2004-11-23T11:49:10.000Z\tstuNNed\t\tfirefox 1.0\n"
        "2004-11-23T11:50:00.000Z\tcrimsun\tstuNNed\tupdate the plugin\n"
        "2004-11-23T11:51:00.000Z\tstuNNed\tcrimsun\tthanks\n",
        encoding="utf-8",
    )
    expected = [[Turn("user", "any ideas why java is slow?\nfirefox 1.0"), Turn("assistant", "update the plugin")]]
    assert list(load_ubuntu(tmp_path / "dialogs")) == expected
    assert list(load_ubuntu(folder / "1.tsv")) == expected


def test_pydoc_dialogues_deterministic_and_plentiful() -> None:
    first = list(pydoc_dialogues(seed=0, max_chars=600))
    assert len(first) >= 100
    assert first == list(pydoc_dialogues(seed=0, max_chars=600))
    for d in first:
        assert [t.role for t in d] == ["user", "assistant"]
        assert d[0].text.endswith(("?", "."))
        assert 40 <= len(d[1].text) <= 604  # a cut first paragraph may end in " ..."
    questions = {d[0].text for d in first}
    assert any('the "assert" statement' in q for q in questions)
    assert len({q.split(" ")[0] for q in questions}) >= 3  # several phrasings are in use
    other = list(pydoc_dialogues(seed=1, max_chars=600))
    assert [d[1] for d in other] == [d[1] for d in first] and [d[0] for d in other] != [d[0] for d in first]
    assert all(len(d[1].text) <= 304 for d in pydoc_dialogues(max_chars=300))


# -- templates --------------------------------------------------------------------------------------


def test_chat_template_exact() -> None:
    segments = format_dialogue(DIALOGUE, "chat")
    assert segments == [
        ("System: You are terse.\n\nUser: What is the answer?\n\nAssistant:", False),
        (" It is 42.\nTrust me.\n\n", True),  # a blank line inside a turn would end it: collapsed
        ("User: Why?\n\nAssistant:", False),
        (" Because.\n\n", True),
    ]


def test_one_state_template_exact() -> None:
    segments = format_dialogue(DIALOGUE[1:3], "one-state")
    text = "".join(s.text for s in segments)
    assert text == "<s>User:What is the answer?\n\n</s>Assistant:It is 42.\nTrust me.\n\n</s>"
    assert segments[-1] == ("It is 42.\nTrust me.\n\n</s>", True)
    assert not segments[0].trainable


def test_template_collapses_blank_lines_but_keeps_indentation() -> None:
    d = [Turn("user", "  code:\r\n\r\n\n   \n    x = 1\n"), Turn("assistant", "ok")]
    assert format_dialogue(d, "chat")[0].text == "User: code:\n    x = 1\n\nAssistant:"


def test_unknown_template_rejected() -> None:
    with pytest.raises(ValueError, match="unknown template"):
        format_dialogue(DIALOGUE, "alpaca")  # type: ignore[arg-type]


# -- tokenization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "one-state"])
def test_mask_covers_exactly_assistant_tokens(tok: GreedyTokenizer, template: str) -> None:
    ids, mask = tokenize_dialogue(DIALOGUE, tok, template)  # type: ignore[arg-type]
    segments = format_dialogue(DIALOGUE, template)  # type: ignore[arg-type]
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    body, body_mask = ids[:-1], mask[:-1]
    trained = tok.decode([i for i, m in zip(body, body_mask) if m])
    assert trained == "".join(s.text for s in segments if s.trainable)
    assert tok.decode([i for i, m in zip(body, body_mask) if not m]) == "".join(
        s.text for s in segments if not s.trainable
    )
    # Each masked run decodes to exactly one assistant segment: the boundary falls between tokens.
    runs, current = [], []
    for i, m in zip(body, body_mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == [s.text for s in segments if s.trainable]
    assert tok.decode(body) == "".join(s.text for s in segments)


def test_per_segment_encoding_differs_from_whole_string(tok: GreedyTokenizer) -> None:
    # Why segments are encoded separately: whole-string encoding merges ":" + " " across the boundary.
    d = [Turn("user", "Hi"), Turn("assistant", "Yo")]
    ids, _ = tokenize_dialogue(d, tok, "chat", append_eos=False)
    whole = tok.encode("".join(s.text for s in format_dialogue(d, "chat")))
    assert ids != whole and tok.decode(ids) == tok.decode(whole)


def test_mask_user_false_trains_everything_with_same_tokens(tok: GreedyTokenizer) -> None:
    masked = tokenize_dialogues([DIALOGUE], tok, "chat")
    full = tokenize_dialogues([DIALOGUE], tok, "chat", mask_user=False)
    assert torch.equal(masked.tokens, full.tokens)
    assert bool((full.mask == 1).all()) and masked.num_trainable < full.num_trainable
    no_eos = tokenize_dialogues([DIALOGUE], tok, "chat", append_eos=False)
    assert no_eos.num_tokens == masked.num_tokens - 1


def test_real_world_tokenizer_mask() -> None:
    mod = pytest.importorskip("worker.tokenizer")
    tok = mod.WorldTokenizer()
    d = [Turn("user", "What is 2+2?"), Turn("assistant", "It is 4.\n\nSimple.")]
    ids, mask = tokenize_dialogue(d, tok, "chat")
    assert ids[-1] == 0 and tok.eos_id == 0
    assert tok.decode([i for i, m in zip(ids[:-1], mask[:-1]) if m]) == " It is 4.\nSimple.\n\n"
    assert tok.decode(ids[:-1]) == "User: What is 2+2?\n\nAssistant: It is 4.\nSimple.\n\n"


# -- dataset ----------------------------------------------------------------------------------------


def test_split_by_dialogue_is_deterministic(tok: GreedyTokenizer) -> None:
    ds = _toy_dataset(tok)
    train, val = ds.split(0.25, seed=3)
    assert (len(train), len(val)) == (30, 10)
    assert sorted(_docs(train) + _docs(val)) == sorted(_docs(ds))  # whole dialogues, none lost or cut
    assert train.num_tokens + val.num_tokens == ds.num_tokens
    assert train.num_trainable + val.num_trainable == ds.num_trainable
    again_train, again_val = ds.split(0.25, seed=3)
    assert torch.equal(again_val.tokens, val.tokens) and torch.equal(again_train.offsets, train.offsets)
    assert _docs(ds.split(0.25, seed=4)[1]) != _docs(val)
    assert len(ds.split(0.001, seed=0)[1]) == 1  # a requested split is never empty
    with pytest.raises(ValueError):
        ds.split(1.0)


def test_save_load_round_trip(tok: GreedyTokenizer, tmp_path: Path) -> None:
    ds = tokenize_dialogues([DIALOGUE, DIALOGUE[1:3]], tok, "one-state", meta={"source": "test"})
    path = tmp_path / "sub" / "d.pt"
    ds.save(path)
    back = TokenDataset.load(path)
    assert torch.equal(back.tokens, ds.tokens) and back.tokens.dtype == torch.int32
    assert torch.equal(back.mask, ds.mask) and back.mask.dtype == torch.uint8
    assert torch.equal(back.offsets, ds.offsets) and len(back) == 2
    assert back.meta["template"] == "one-state" and back.meta["source"] == "test"
    torch.save({"tokens": ds.tokens}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a"):
        TokenDataset.load(tmp_path / "other.pt")


def test_binidx_round_trip(tok: GreedyTokenizer, tmp_path: Path) -> None:
    ds = _toy_dataset(tok, n=5)
    ds.save_binidx(tmp_path / "d")
    idx = (tmp_path / "d.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, n_seq, n_doc = struct.unpack_from("<QBQQ", idx, 9)
    assert (version, dtype_code, n_seq, n_doc) == (1, 8, 5, 6)
    header = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(idx, dtype="<i4", count=n_seq, offset=header)
    pointers = np.frombuffer(idx, dtype="<i8", count=n_seq, offset=header + 4 * n_seq)
    doc_idx = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=header + 12 * n_seq)
    assert len(idx) == header + 12 * n_seq + 8 * n_doc
    assert doc_idx.tolist() == list(range(6))
    data = np.memmap(tmp_path / "d.bin", dtype="<u2", mode="r")
    assert data.tolist() == ds.tokens.tolist()
    for i in range(n_seq):
        doc = np.frombuffer(data, dtype="<u2", count=int(sizes[i]), offset=int(pointers[i]))
        assert doc.tolist() == ds.document(i)[0].tolist()
        assert doc[-1] == 0  # each document ends with eos


def test_batches_are_shifted_windows(tok: GreedyTokenizer) -> None:
    ds = _toy_dataset(tok)
    tokens, mask = ds.tokens.long(), ds.mask
    batches = list(ds.batches(ctx_len=16, batch_size=4, seed=7, num_batches=3))
    assert len(batches) == 3
    for x, y, m in batches:
        assert x.shape == y.shape == m.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in range(4):  # each row is a real window: find it and check target and mask alignment
            starts = [s for s in range(ds.num_tokens - 16) if torch.equal(tokens[s : s + 16], x[row])]
            assert any(
                torch.equal(tokens[s + 1 : s + 17], y[row]) and torch.equal(mask[s + 1 : s + 17], m[row])
                for s in starts
            )
    again = next(ds.batches(ctx_len=16, batch_size=4, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(again, batches[0]))
    with pytest.raises(ValueError):
        next(ds.batches(ctx_len=ds.num_tokens, batch_size=1))


def test_eval_windows_cover_every_target_once(tok: GreedyTokenizer) -> None:
    ds = _toy_dataset(tok, n=7)
    windows = list(ds.eval_windows(ctx_len=10))
    assert all(x.shape[0] == 1 and x.shape[1] <= 10 for x, _, _ in windows)
    assert all(x.shape[1] == 10 for x, _, _ in windows[:-1])
    assert torch.cat([x[0] for x, _, _ in windows]).tolist() == ds.tokens[:-1].tolist()
    assert torch.cat([y[0] for _, y, _ in windows]).tolist() == ds.tokens[1:].tolist()
    assert int(sum(m.sum() for _, _, m in windows)) == int(ds.mask[1:].sum())


# -- command line -----------------------------------------------------------------------------------


def test_prepare_command(tok: GreedyTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import tuning.prepare as prepare

    monkeypatch.setattr(prepare, "world_tokenizer", lambda: tok)
    out = tmp_path / "data" / "pydoc.pt"
    args = ["--source", "pydoc", "--template", "chat", "--out", str(out), "--val-fraction", "0.1", "--binidx"]
    result = CliRunner().invoke(prepare.app, args)
    assert result.exit_code == 0, result.output
    train, val = TokenDataset.load(out), TokenDataset.load(tmp_path / "data" / "pydoc.val.pt")
    total = len(list(pydoc_dialogues()))
    assert len(train) + len(val) == total and len(val) == round(total * 0.1)
    assert f"{len(train):,}" in result.output and f"{train.num_trainable:,}" in result.output
    assert (tmp_path / "data" / "pydoc.bin").stat().st_size == 2 * train.num_tokens

    bad = CliRunner().invoke(prepare.app, ["--source", "jsonl", "--out", str(out)])
    assert bad.exit_code == 1 and "--input is required" in bad.output


# -- tool calls ---------------------------------------------------------------------------------------------


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_tool_dialogue_renders_as_the_service_feeds_it(tmp_path: Path) -> None:
    """An OpenAI-style record with tools, an assistant tool call and the tool's result renders, for training, to
    exactly the text the service feeds for the same conversation (common/templates.py over the gateway's messages),
    and the trained reply is the call as the tool grammar writes it and the parser reads it back."""
    from common.templates import TEMPLATES, Message, messages_text
    from common.tools import offer_tools, parse_tool_calls, parse_tools, render_tool_calls, render_tool_result

    record = {"tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "21 C in Paris."},
    ]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (dialogue,) = load_jsonl(path)
    assert [t.role for t in dialogue] == ["system", "user", "assistant", "tool", "assistant"]
    segments = format_dialogue(dialogue, "chat")
    call = render_tool_calls([{"name": "weather", "arguments": {"city": "Paris"}}])
    assert segments[1] == (call + "\n\n", True)  # right after "Assistant:", no space: as the grammar writes it
    assert parse_tool_calls(segments[1].text).calls[0].arguments == {"city": "Paris"}
    # The same conversation as the gateway hands it to the workers (before the last reply)
    served = [Message("system", offer_tools("Be brief.", parse_tools(TOOLS))), Message("user", "Weather in Paris?"),
              Message("assistant", call), Message("tool", '{"temp_c": 21}', name="weather")]
    prompt = "".join(s.text for s in segments[:-1])
    assert prompt == messages_text(TEMPLATES["chat"], served)
    assert render_tool_result("weather", '{"temp_c": 21}') in prompt
    assert segments[-1] == (" 21 C in Paris.\n\n", True)


def test_tool_message_without_its_call_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                             {"role": "tool", "tool_call_id": "nope", "content": "1"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*tool message needs"):
        list(load_jsonl(path))
