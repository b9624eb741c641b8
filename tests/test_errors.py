"""The one table from domain exceptions to gRPC status codes, and back (what the front does with a worker's error)."""

from __future__ import annotations

import grpc
import pytest

from common import errors
from common.errors import (
    STATUS_CODES,
    LeaseLost,
    Overloaded,
    ServeError,
    SessionNotFound,
    from_status,
    status_code,
    trailing_metadata,
)


@pytest.mark.parametrize("cls", sorted(STATUS_CODES, key=lambda c: c.__name__))
def test_every_error_round_trips_through_its_status(cls: type[ServeError]) -> None:
    exc = cls("boom")
    code = status_code(exc)
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    back = from_status(code, "boom", trailing_metadata(exc))
    assert type(back) is cls and back.message == "boom"


def test_expected_codes() -> None:
    assert status_code(SessionNotFound()) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.SessionBusy()) == grpc.StatusCode.ABORTED
    assert status_code(LeaseLost()) == grpc.StatusCode.ABORTED
    assert status_code(errors.StateCorrupt()) == grpc.StatusCode.DATA_LOSS
    assert status_code(errors.Unavailable()) == grpc.StatusCode.UNAVAILABLE
    assert status_code(errors.DeadlineExceeded()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_overloaded_carries_retry_after() -> None:
    meta = dict(trailing_metadata(Overloaded("full", retry_after_s=2.5)))
    assert meta[errors.RETRY_AFTER_KEY] == "2500"
    back = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", list(meta.items()))
    assert isinstance(back, Overloaded) and back.retry_after_s == 2.5


def test_bare_status_without_metadata() -> None:
    assert isinstance(from_status(grpc.StatusCode.NOT_FOUND, "x"), SessionNotFound)
    assert isinstance(from_status(grpc.StatusCode.UNAVAILABLE, "x"), errors.Unavailable)
    assert from_status(grpc.StatusCode.OK, "") is None
    assert type(from_status(grpc.StatusCode.INTERNAL, "bug")) is ServeError
