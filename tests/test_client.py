"""SDK tests: the status -> exception table, and the sync and asyncio clients against a real front on port 0
(real Redis, scripted workers from tests/fakes.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import rwkv_serve_client as client
from common import errors as server_errors
from rwkv_serve import contract
from rwkv_serve_client import (
    AsyncRWKVClient,
    ChatTemplate,
    RWKVClient,
    SessionNotFoundError,
    StopReason,
    TextDelta,
    TurnResult,
    TurnStarted,
)
from rwkv_serve_client.errors import ERRORS_BY_CODE, error_from_status
from tests.e2e_fixtures import fakes, front_factory, key_entry  # noqa: F401  (fixtures)


def test_every_server_error_becomes_its_typed_exception() -> None:
    assert client.errors.ERROR_KEY == server_errors.ERROR_KEY == contract.ERROR_KEY
    assert client.errors.RETRY_AFTER_KEY == server_errors.RETRY_AFTER_KEY == contract.RETRY_AFTER_KEY
    expected = {
        "InvalidArgument": client.InvalidArgumentError, "SessionNotFound": client.SessionNotFoundError,
        "ModelNotFound": client.ModelNotFoundError, "PresetNotFound": client.PresetNotFoundError,
        "SessionBusy": client.SessionBusyError, "VersionConflict": client.VersionConflictError,
        "LeaseLost": client.VersionConflictError, "StateCorrupt": client.DataLossError,
        "Overloaded": client.ResourceExhaustedError, "Unavailable": client.UnavailableError,
        "DeadlineExceeded": client.DeadlineExceededError, "Cancelled": client.RequestCancelledError,
        "Unauthenticated": client.AuthenticationError, "PermissionDenied": client.PermissionDeniedError,
        "QuotaExceeded": client.QuotaExceededError, "WorkerLost": client.UnavailableError,
        "StoreUnavailable": client.UnavailableError, "PresetExists": client.PresetExistsError,
        "ForeignState": client.ForeignStateError,
    }
    for cls in server_errors.STATUS_CODES:  # what the server sends for each domain error
        exc = cls("boom")
        error = error_from_status(server_errors.status_code(exc), exc.message, server_errors.trailing_metadata(exc))
        assert type(error) is expected[cls.__name__], cls
        assert error.message == "boom" and error.code == server_errors.status_code(exc)
    overloaded = server_errors.Overloaded("full", retry_after_s=0.25)
    error = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", server_errors.trailing_metadata(overloaded))
    assert error.retry_after_s == 0.25
    # Bare codes (no class name in the metadata) still get the code's class; unknown codes are internal.
    assert type(error_from_status(grpc.StatusCode.NOT_FOUND, "x")) is client.NotFoundError
    assert type(error_from_status(grpc.StatusCode.INTERNAL, "x")) is client.InternalError
    assert type(error_from_status(grpc.StatusCode.UNKNOWN, "x")) is client.InternalError
    assert all(issubclass(c, client.RWKVError) for c in ERRORS_BY_CODE.values())


def test_the_sdk_speaks_the_shared_contract() -> None:
    """One StopReason and one list of sampling fields for the SDK and the server (rwkv_serve.contract)."""
    assert client.StopReason is contract.StopReason and client.types.StopReason is contract.StopReason
    assert StopReason.MAX_TOKENS.label == "max_tokens"
    assert client._core.call_metadata("k") == ((contract.API_KEY_HEADER, "Bearer k"),)
    assert client._core.call_metadata(None) == ()
    # Every sampling field the contract lists is a keyword argument the SDK accepts (and sends).
    values = {"float": 0.5, "int": 3, "tokens": [1, 2], "strings": ["\n"], "format": {"regex": "a+"}}
    sampling = client._core.chat_turn("sid", "hi", **{name: values[kind] for name, kind in
                                                      contract.SAMPLING_FIELDS.items()}).turn.sampling
    assert contract.sampling_from_pb(sampling) == {name: values[kind]
                                                   for name, kind in contract.SAMPLING_FIELDS.items()}
    # No sampling arguments: the request leaves the field unset (the session's defaults apply).
    assert not client._core.chat_turn("sid", "hi").turn.HasField("sampling")
    assert not client._core.create_session("m").request.HasField("default_sampling")


def test_sampling_arguments_are_checked_before_sending() -> None:
    with pytest.raises(TypeError, match="temprature"):
        client._core.chat_turn("sid", "hi", temprature=0.5)
    with pytest.raises(TypeError, match="temprature"):
        client._core.create_session("m", temprature=0.5)
    request = client._core.chat_turn("sid", "hi", temperature=0, stop_strings="\n", banned_tokens=[1, 2], seed=3)
    sampling = request.turn.sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0
    assert list(sampling.stop_strings.values) == ["\n"] and list(sampling.banned_tokens.ids) == [1, 2]
    assert not sampling.HasField("top_p") and request.turn.turn_id


def _sync_scenario(target: str) -> None:
    """Everything the blocking client does, run in a thread (the servers live on the test's event loop)."""
    with RWKVClient(target) as rwkv:
        models = rwkv.list_models()
        assert [(m.id, m.workers) for m in models] == [("tiny", 1)]
        session = rwkv.create_session("tiny", template="chat", system_prompt="sys", metadata={"k": "v"},
                                      temperature=0.2, max_tokens=50)
        assert session.template is ChatTemplate.CHAT and session.default_sampling == {"temperature": pytest.approx(0.2),
                                                                                       "max_tokens": 50}
        assert rwkv.get_session(session.session_id) == session
        items = list(rwkv.chat(session.session_id, "hello there", temperature=0))
        assert items[:-1] == ["w1: ", "hello ", "there "]
        result = items[-1]
        assert isinstance(result, TurnResult) and result.text == "w1: hello there "
        assert result.stop_reason is StopReason.STOP_TOKEN and result.worker_id == "w1"
        assert result.usage.generated_tokens == 3 and result.state_version >= 1
        with_ids = rwkv.say(session.session_id, "x", return_token_ids=True, max_tokens=1)
        assert with_ids.token_ids == [1] and with_ids.stop_reason is StopReason.MAX_TOKENS

        fork = rwkv.fork_session(session.session_id, metadata={"branch": "b"})
        assert fork.forked_from == session.session_id and fork.metadata == {"branch": "b"}
        assert {s.session_id for s in rwkv.iter_sessions(page_size=1)} == {session.session_id, fork.session_id}

        # The bidirectional helper: two turns on one stream, the second cancelled.
        with rwkv.chat_stream(session.session_id) as stream:
            stream.send("one")
            events = list(stream.until_turn_end())
            assert isinstance(events[0], TurnStarted) and isinstance(events[1], TextDelta)
            assert events[-1].text == "w1: one "
            long_turn = stream.send("endless", max_tokens=100_000, turn_id="long")
            assert long_turn == "long"
            seen = 0
            for event in stream:
                if isinstance(event, TextDelta):
                    seen += 1
                    if seen == 3:
                        stream.cancel()
                if isinstance(event, TurnResult):
                    assert event.cancelled and event.turn_id == "long" and seen >= 3
                    break

        gen = list(rwkv.generate("a b", model="tiny"))
        assert gen[-1].text == "w1: a b " and "".join(gen[:-1]) == gen[-1].text
        assert rwkv.complete("c", session_id=session.session_id, ephemeral=True).text == "w1: c "
        assert rwkv.tokenize("tiny", "aa bbb") == [2, 3]

        rwkv.delete_session(fork.session_id)
        with pytest.raises(SessionNotFoundError):
            rwkv.get_session(fork.session_id)
        with pytest.raises(SessionNotFoundError):
            list(rwkv.chat(fork.session_id, "hi"))
        with pytest.raises(client.ModelNotFoundError):
            rwkv.create_session("ghost")
        with pytest.raises(client.InvalidArgumentError):
            rwkv.create_session("tiny", top_p=2.0)
        with pytest.raises(client.VersionConflictError):
            rwkv.fork_session(session.session_id, expected_state_version=999)


async def test_sync_client(fakes, front_factory) -> None:  # noqa: F811
    worker = await fakes("w1")
    worker.servicer.delay_s = 0.002
    _, target = await front_factory()
    await asyncio.wait_for(asyncio.to_thread(_sync_scenario, target), 60)
    assert worker.servicer.cancelled == 1  # the cancelled turn stopped on the worker too


async def test_async_client(fakes, front_factory) -> None:  # noqa: F811
    worker = await fakes("w1")
    _, target = await front_factory(api_key_hashes=[key_entry("team", "secret")])
    async with AsyncRWKVClient(target, api_key="secret") as rwkv:
        session = await rwkv.create_session("tiny", template=ChatTemplate.RAW)
        assert session.template is ChatTemplate.RAW
        items = [item async for item in rwkv.chat(session.session_id, "hi you")]
        assert items[:-1] == ["w1: ", "hi ", "you "] and items[-1].text == "w1: hi you "
        assert (await rwkv.say(session.session_id, "again")).text == "w1: again "
        page = await rwkv.list_sessions()
        assert [s.session_id for s in page.sessions] == [session.session_id] and page.next_page_token == ""
        worker.servicer.endless, worker.servicer.delay_s = True, 0.005
        async with rwkv.chat_stream(session.session_id) as stream:
            await stream.send("go", turn_id="g")
            deltas = 0
            async for event in stream:
                if isinstance(event, TextDelta):
                    deltas += 1
                    if deltas == 2:
                        await stream.cancel("g")
                elif isinstance(event, TurnResult):
                    assert event.stop_reason is StopReason.CANCELLED
                    break
        worker.servicer.endless = False
        result = await rwkv.complete("p", model="tiny", max_tokens=2)
        assert result.text == "w1: p " and result.stop_reason is StopReason.MAX_TOKENS
        await rwkv.delete_session(session.session_id)
        with pytest.raises(SessionNotFoundError):
            await rwkv.delete_session(session.session_id)
        with pytest.raises(SessionNotFoundError):
            [item async for item in rwkv.chat(session.session_id, "x")]
    async with AsyncRWKVClient(target, api_key="wrong") as rwkv:
        with pytest.raises(client.AuthenticationError):
            await rwkv.list_models()


def test_unreachable_server_is_a_typed_error() -> None:
    with RWKVClient("127.0.0.1:1", timeout=2) as rwkv:
        with pytest.raises(client.UnavailableError):
            rwkv.list_models()
        with pytest.raises(client.UnavailableError):
            list(rwkv.chat("abcdefgh", "hi", timeout=2))


async def test_unreachable_server_is_a_typed_error_async() -> None:
    async with AsyncRWKVClient("127.0.0.1:1", timeout=2) as rwkv:
        with pytest.raises(client.UnavailableError):
            await rwkv.get_session("abcdefgh")
        with pytest.raises(client.UnavailableError):
            [x async for x in rwkv.generate("hi", model="m", timeout=2)]
        with pytest.raises(client.UnavailableError):
            [x async for x in rwkv.chat("abcdefgh", "hi", timeout=2)]


def test_unavailable_carries_the_retry_hint() -> None:
    lost = server_errors.WorkerLost("worker died", worker_id="w1")
    error = error_from_status(server_errors.status_code(lost), lost.message, server_errors.trailing_metadata(lost))
    assert isinstance(error, client.UnavailableError) and error.retry_after_s == 0.0
    bare = error_from_status(grpc.StatusCode.UNAVAILABLE, "no worker")
    assert isinstance(bare, client.UnavailableError) and bare.retry_after_s is None


# ---- retries of a turn (same turn id) ------------------------------------------------------------------------


async def test_a_failed_turn_is_retried_with_the_same_turn_id(fakes, front_factory) -> None:  # noqa: F811
    worker = await fakes("w1")
    _, target = await front_factory()
    servicer = worker.servicer

    def scenario() -> None:
        with RWKVClient(target, retry_backoff_s=0.01) as rwkv:
            sid = rwkv.create_session("tiny").session_id
            servicer.error, servicer.error_times = server_errors.Overloaded("full", retry_after_s=0.05), 2
            assert rwkv.say(sid, "a b").text == "w1: a b "  # RESOURCE_EXHAUSTED with a hint: retried
            assert len({r.turn_id for r in servicer.requests}) == 1 and len(servicer.requests) == 3
            servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 1
            assert list(rwkv.chat(sid, "c", turn_id="mine"))[-1].turn_id == "mine"  # UNAVAILABLE: retried
            assert [r.turn_id for r in servicer.requests[-2:]] == ["mine", "mine"]
            servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 1
            assert rwkv.complete("d", model="tiny").text == "w1: d "  # completions too
            servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 9
            asked = len(servicer.requests)
            with pytest.raises(client.UnavailableError):  # bounded: 1 + max_turn_retries attempts
                rwkv.say(sid, "e")
            assert len(servicer.requests) - asked == 4
            for error in (server_errors.DeadlineExceeded("late"), server_errors.InvalidArgument("bad")):
                servicer.error, servicer.error_times = error, 1
                asked = len(servicer.requests)
                with pytest.raises(client.RWKVError):  # not retryable: one attempt
                    rwkv.say(sid, "f")
                assert len(servicer.requests) - asked == 1
            servicer.error = None
        with RWKVClient(target, max_turn_retries=0) as rwkv:  # the off switch
            servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 1
            asked = len(servicer.requests)
            with pytest.raises(client.UnavailableError):
                rwkv.say(sid, "g")
            assert len(servicer.requests) - asked == 1
            servicer.error = None

    await asyncio.wait_for(asyncio.to_thread(scenario), 60)


async def test_the_async_client_retries_as_the_blocking_one(fakes, front_factory) -> None:  # noqa: F811
    worker = await fakes("w1")
    _, target = await front_factory()
    servicer = worker.servicer
    async with AsyncRWKVClient(target, retry_backoff_s=0.01) as rwkv:
        sid = (await rwkv.create_session("tiny")).session_id
        servicer.error, servicer.error_times = server_errors.Overloaded("full", retry_after_s=0.01), 1
        assert (await rwkv.say(sid, "a")).text == "w1: a "
        servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 1
        items = [item async for item in rwkv.generate("b c", model="tiny", turn_id="g1")]
        assert items[:-1] == ["w1: ", "b ", "c "] and items[-1].turn_id == "g1"
        assert [r.turn_id for r in servicer.requests[-2:]] == ["g1", "g1"]
    async with AsyncRWKVClient(target, max_turn_retries=0) as rwkv:
        servicer.error, servicer.error_times = server_errors.Unavailable("draining"), 1
        with pytest.raises(client.UnavailableError):
            await rwkv.say(sid, "d")
    with pytest.raises(ValueError):
        AsyncRWKVClient(target, max_turn_retries=-1)


def _result(text: str, turn_id: str = "t") -> TurnResult:
    return TurnResult(turn_id, text, StopReason.MAX_TOKENS, client.Usage(1, 2, 3), 1)


def _delta(text: str) -> TextDelta:
    return TextDelta("t", text, [], [])


def test_a_retried_stream_yields_only_the_text_not_yielded_yet() -> None:
    lost = client.UnavailableError("lost worker w1", grpc.StatusCode.UNAVAILABLE)
    lost.retry_after_s = 0.0
    retry = client._core.TurnRetry(3, 0.1, None, streaming=True)
    assert [retry.items(_delta("Hel")), retry.items(_delta("lo"))] == [["Hel"], ["lo"]]
    assert retry.delay(lost) == 0.0
    # The retry repeats the text (the committed result in one delta, or a rerun): only the rest comes out.
    assert retry.items(TurnStarted("t", 3, "w2")) == []
    assert retry.items(_delta("Hello, wor")) == [", wor"]
    assert retry.items(_delta("ld")) == ["ld"]
    result = _result("Hello, world")
    assert retry.items(result) == [result]
    with pytest.raises(client.UnavailableError):  # after the result nothing is retried
        retry.delay(lost)


@pytest.mark.parametrize("retried", [["Help"], ["He"]], ids=["other text", "shorter text"])
def test_a_retried_stream_with_another_text_raises_the_original_error(retried: list[str]) -> None:
    lost = client.UnavailableError("lost worker w1", grpc.StatusCode.UNAVAILABLE)
    retry = client._core.TurnRetry(3, 0.1, None, streaming=True)
    assert retry.items(_delta("Hello")) == ["Hello"]
    retry.delay(lost)
    with pytest.raises(client.UnavailableError) as raised:
        for text in retried:
            retry.items(_delta(text))
        retry.items(_result("".join(retried)))
    assert raised.value is lost and "lost worker w1" in raised.value.message and "retry cancelled" in str(lost)
    with pytest.raises(client.UnavailableError):
        retry.delay(lost)  # given up: not retried again


def test_which_failures_are_retried_and_when() -> None:
    def error(cls: type, retry_after: float | None = None) -> client.RWKVError:
        made = cls("x")
        made.retry_after_s = retry_after
        return made

    retry = client._core.TurnRetry(3, 0.1, None, streaming=False)
    assert retry.items(_delta("ignored")) == []  # say(): partial text does not matter
    assert retry.delay(error(client.UnavailableError)) == pytest.approx(0.1)  # no hint: backoff, doubling
    assert retry.delay(error(client.ResourceExhaustedError, 0.5)) == 0.5  # the server's hint
    assert retry.delay(error(client.SessionBusyError)) == pytest.approx(0.4)  # busy, on a retry only
    with pytest.raises(client.UnavailableError):
        retry.delay(error(client.UnavailableError))  # out of retries (3)
    for not_retried in (error(client.QuotaExceededError, 5.0), error(client.ResourceExhaustedError),
                        error(client.DeadlineExceededError), error(client.VersionConflictError),
                        error(client.SessionBusyError), error(client.UnavailableError, 60.0)):
        with pytest.raises(type(not_retried)):
            client._core.TurnRetry(3, 0.1, None, streaming=False).delay(not_retried)
    with pytest.raises(client.UnavailableError):  # the wait would pass the turn's timeout
        client._core.TurnRetry(3, 0.1, 0.5, streaming=False).delay(error(client.UnavailableError, 1.0))
    with pytest.raises(client.UnavailableError):  # retries off
        client._core.TurnRetry(0, 0.1, None, streaming=False).delay(error(client.UnavailableError))
