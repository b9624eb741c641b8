"""The blocking and asyncio SDK clients are twins: the same public methods with the same parameters, the async one
awaitable (or an async iterator) wherever the blocking one returns (or yields)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from rwkv_serve_client import AsyncChatStream, AsyncRWKVClient, ChatStream, RWKVClient

PAIRS = [(RWKVClient, AsyncRWKVClient), (ChatStream, AsyncChatStream)]

# Protocol methods: the blocking one's name -> its asyncio twin's name.
DUNDER_TWINS = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__iter__": "__aiter__", "__next__": "__anext__"}
# Plain functions on both sides: opening a stream does no I/O (the async stream is entered with `async with`), and
# closing a stream only cancels its call.
PLAIN_ON_BOTH = {("RWKVClient", "chat_stream"), ("ChatStream", "close"), ("ChatStream", "__iter__")}
# Parameter types that differ by design: the blocking one's -> the asyncio one's.
TYPE_TWINS = {"grpc.Channel": "grpc.aio.Channel"}
_DUNDERS = {"__init__", *DUNDER_TWINS, *DUNDER_TWINS.values()}


def _public(cls: type) -> dict[str, Any]:
    return {name: member for name, member in vars(cls).items()
            if callable(member) and (not name.startswith("_") or name in _DUNDERS)}


def _async_name(name: str) -> str:
    return DUNDER_TWINS.get(name, name)


def _annotation(annotation: Any) -> Any:
    if not isinstance(annotation, str):  # no annotation (self)
        return annotation
    for sync_type, async_type in TYPE_TWINS.items():
        annotation = re.sub(rf"\b{re.escape(sync_type)}\b", async_type, annotation)
    return annotation


def _parameters(fn: Any, twin_types: bool = False) -> list[tuple[str, Any, Any, Any]]:
    """Name, kind, default and annotation of each parameter (the return annotation differs by design); with
    twin_types the blocking parameter types are written as their asyncio twins."""
    return [(p.name, p.kind, p.default, _annotation(p.annotation) if twin_types else p.annotation)
            for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("sync_cls, async_cls", PAIRS, ids=lambda c: c.__name__)
def test_the_twins_have_the_same_methods(sync_cls: type, async_cls: type) -> None:
    sync_names = {_async_name(name) for name in _public(sync_cls)}
    async_names = set(_public(async_cls))
    assert sync_names == async_names, (f"only in {sync_cls.__name__}: {sorted(sync_names - async_names)}; "
                                       f"only in {async_cls.__name__}: {sorted(async_names - sync_names)}")


@pytest.mark.parametrize("sync_cls, async_cls", PAIRS, ids=lambda c: c.__name__)
def test_the_twins_have_the_same_signatures(sync_cls: type, async_cls: type) -> None:
    async_methods = _public(async_cls)
    for name, sync_fn in _public(sync_cls).items():
        async_fn = async_methods.get(_async_name(name))
        if async_fn is None:
            continue  # reported by test_the_twins_have_the_same_methods
        assert _parameters(sync_fn, twin_types=True) == _parameters(async_fn), f"{sync_cls.__name__}.{name}"


@pytest.mark.parametrize("sync_cls, async_cls", PAIRS, ids=lambda c: c.__name__)
def test_the_async_twin_is_awaitable_where_the_sync_one_blocks(sync_cls: type, async_cls: type) -> None:
    async_methods = _public(async_cls)
    for name, sync_fn in _public(sync_cls).items():
        async_fn = async_methods.get(_async_name(name))
        if async_fn is None or name == "__init__":
            continue
        where = f"{async_cls.__name__}.{_async_name(name)}"
        if (sync_cls.__name__, name) in PLAIN_ON_BOTH:
            assert not inspect.iscoroutinefunction(async_fn) and not inspect.isasyncgenfunction(async_fn), where
            assert not inspect.iscoroutinefunction(sync_fn) and not inspect.isgeneratorfunction(sync_fn), name
        elif inspect.isgeneratorfunction(sync_fn):  # yields: the twin is an async generator
            assert inspect.isasyncgenfunction(async_fn), f"{where} should be an async generator"
        else:
            assert not inspect.iscoroutinefunction(sync_fn), f"{sync_cls.__name__}.{name} is a coroutine function"
            assert inspect.iscoroutinefunction(async_fn), f"{where} should be a coroutine function"


def test_the_checks_catch_a_drift() -> None:
    """A twin with a renamed keyword, a method left blocking or a missing method fails the checks above."""

    class Sync:
        def get(self, key: str, *, timeout: float | None = None) -> int: ...

        def items(self) -> Any:
            yield 1

    class Renamed:
        async def get(self, key: str, *, deadline: float | None = None) -> int: ...

        async def items(self) -> Any:
            yield 1

    class Blocking:
        def get(self, key: str, *, timeout: float | None = None) -> int: ...

        async def items(self) -> Any:
            yield 1

    class NotAnIterator:
        async def get(self, key: str, *, timeout: float | None = None) -> int: ...

        async def items(self) -> Any: ...

    class Missing:
        async def get(self, key: str, *, timeout: float | None = None) -> int: ...

    class Twin:
        async def get(self, key: str, *, timeout: float | None = None) -> int: ...

        async def items(self) -> Any:
            yield 1

    for check, twin in [(test_the_twins_have_the_same_signatures, Renamed),
                        (test_the_async_twin_is_awaitable_where_the_sync_one_blocks, Blocking),
                        (test_the_async_twin_is_awaitable_where_the_sync_one_blocks, NotAnIterator),
                        (test_the_twins_have_the_same_methods, Missing)]:
        with pytest.raises(AssertionError):
            check(Sync, twin)
    for check in (test_the_twins_have_the_same_methods, test_the_twins_have_the_same_signatures,
                  test_the_async_twin_is_awaitable_where_the_sync_one_blocks):
        check(Sync, Twin)  # a faithful twin passes
