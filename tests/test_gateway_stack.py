"""The gateway as deployed: started by rwkv-stack (real processes: Redis, a worker, the front, the gateway), and
speaking HTTPS itself while it reaches a front over TLS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from service.stack import Stack, free_port
from tests.test_gateway_support import MODEL, db_url, start_gateway, start_service
from tests.test_security import Pki, _make_pki

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("gw") / "tiny.pth", n_layer=2, n_embd=128, seed=3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stack(redis_url: str, checkpoint: Path) -> Iterator[Stack]:
    url = db_url(redis_url).rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(url).flushdb()
    stack = Stack(port=free_port(), http_port=free_port(), model=checkpoint, model_id=MODEL, redis_url=url,
                  quiet=True, extra_env={"RWKV_WORKER_TORCH_THREADS": "1", "RWKV_FRONT_DISCOVERY_INTERVAL_S": "0.2"})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_rwkv_stack_starts_the_gateway_on_its_http_port(stack: Stack) -> None:
    with openai.OpenAI(base_url=f"{stack.http_base}/v1", api_key="dev", max_retries=0) as oai:
        assert [m.id for m in oai.models.list().data] == [MODEL]
        done = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           temperature=0, max_tokens=4)
        assert done.usage.completion_tokens >= 1
        first = oai.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=3)
        assert oai.responses.retrieve(first.id).output_text == first.output_text  # Redis reached, tenant dev
    gateway = stack.procs[-1]
    assert gateway.args[1:3] == ["-m", "gateway.server"] and gateway.poll() is None


def test_gateway_serves_https_and_reaches_a_tls_front(redis_url, tiny_model, tokenizer, pki: Pki) -> None:
    service = start_service(redis_url, tiny_model, tokenizer,
                            front={"tls_cert": pki.server_cert, "tls_key": pki.server_key})
    try:
        gateway = start_gateway(service, tls_cert=pki.server_cert, tls_key=pki.server_key, front_ca=pki.ca)
        try:
            base = f"https://127.0.0.1:{gateway.port}/v1"
            with openai.OpenAI(base_url=base, api_key="dev", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(
                                   cafile=str(pki.ca)))) as oai:
                assert [m.id for m in oai.models.list().data] == [MODEL]
            with openai.OpenAI(base_url=gateway.url, api_key="dev", max_retries=0) as plain:  # http:// to HTTPS
                with pytest.raises(openai.APIConnectionError):
                    plain.models.list()
        finally:
            gateway.close()
        untrusting = start_gateway(service, front_ca=pki.other_ca)  # the front's certificate is not trusted
        try:
            with openai.OpenAI(base_url=untrusting.url, api_key="dev", max_retries=0) as oai:
                with pytest.raises(openai.InternalServerError) as refused:
                    oai.models.list()
            assert refused.value.status_code == 503
        finally:
            untrusting.close()
    finally:
        service.close()
