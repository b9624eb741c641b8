"""The load test's short variant (bench/load_test.py): a few sessions for a few seconds through a real front and
worker; no errors, and no turn whose reported version does not read back with a sound state record."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from bench.load_test import check_loopback, run_load, table
from tests.e2e_fixtures import InprocService
from worker.tokenizer import WorldTokenizer

DB = 8


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model) -> Iterator[InprocService]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    svc = InprocService(url, tiny_model, WorldTokenizer(), worker={"max_batch": 8})
    try:
        yield svc
    finally:
        svc.close()


def test_short_load_loses_no_turn(service: InprocService) -> None:
    report = asyncio.run(run_load(service.target, sessions=6, duration_s=5.0, max_tokens=16,
                                  redis_url=service.redis_url))
    summary = report.summary()
    print(table(summary))
    assert summary["error_count"] == 0, summary["errors"]
    assert summary["lost_turns"] == 0
    assert summary["turns"] >= 6 and len(report.reported) == 6  # every session completed turns
    assert summary["ttft_ms"]["n"] > 0 and 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"]
    assert summary["itl_ms"]["n"] > 0 and summary["tokens"] >= summary["itl_ms"]["n"]
    db = redis.Redis.from_url(service.redis_url)
    for sid, version in report.reported.items():  # the check itself: versions really are stored
        assert int(db.hget(f"rwkv:{{{sid}}}:meta", "version")) >= version
    db.close()


def test_the_load_test_refuses_anything_but_loopback() -> None:
    with pytest.raises(SystemExit):
        check_loopback("10.0.0.5:50051")
    check_loopback("127.0.0.1:50051")


def test_lost_turns_are_counted(service: InprocService) -> None:
    """The lost-turn check can fail: a version that was reported but not stored, and a state that is unsound."""
    from bench.load_test import LoadReport, _verify
    from rwkv_serve_client import AsyncRWKVClient

    async def check() -> tuple[int, int]:
        async with AsyncRWKVClient(service.target) as rwkv:
            sids = [(await rwkv.create_session("tiny", max_tokens=2)).session_id for _ in range(2)]
            for sid in sids:
                await rwkv.say(sid, "hi")
            report = LoadReport(2, 1.0, 2, reported={sids[0]: 3, sids[1]: 1})  # sids[0] claims 2 turns it never had
            await _verify(rwkv, report, service.redis_url, "tiny")
            lost_versions = report.lost_turns
            db = redis.Redis.from_url(service.redis_url)
            db.set(f"rwkv:{{{sids[1]}}}:state", b"garbage", keepttl=True)
            db.close()
            report = LoadReport(2, 1.0, 2, reported={sids[1]: 1})
            await _verify(rwkv, report, service.redis_url, "tiny")
            return lost_versions, report.lost_turns

    assert asyncio.run(check()) == (2, 1)
