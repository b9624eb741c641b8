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
    values = {"float": 0.5, "int": 3, "tokens": [1, 2], "strings": ["\n"]}
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
