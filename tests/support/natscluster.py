"""A 3-node nats-server JetStream cluster on loopback, for tests that kill a stream's leader.

Each node has its own config file, store and fixed ports (kept across kill() and start()),
and routes to the other two. NatsCluster.start() returns once the cluster has formed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import httpx

from support.servers import (
    NATS_INSTALL,
    _log_tail,
    _ServerProcess,
    _Workdir,
    find_executable,
    free_port,
    wait_for_http,
)

NODE_CONF = """\
server_name: "{name}"
listen: "127.0.0.1:{port}"
http: "127.0.0.1:{monitor_port}"
jetstream {{ store_dir: "{store}" }}
cluster {{
  name: "{cluster}"
  listen: "127.0.0.1:{route_port}"
  routes: [{routes}]
}}
"""


class NatsNode(_ServerProcess):
    """One node of a NatsCluster: name, url, monitor_url, route_port."""

    def __init__(self, directory: Path, name: str) -> None:
        super().__init__(directory / name, "nats-node-", "nats-server.log")
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.route_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.monitor_url = f"http://127.0.0.1:{self.monitor_port}"
        self.config_path = self.dir / "nats.conf"

    def write_config(self, cluster: str, peers: list[NatsNode]) -> None:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p.route_port}"' for p in peers)
        self.config_path.write_text(
            NODE_CONF.format(
                name=self.name,
                port=self.port,
                monitor_port=self.monitor_port,
                store=self.dir / "js",
                cluster=cluster,
                route_port=self.route_port,
                routes=routes,
            )
        )

    def start(self) -> Self:
        """Start (again, with the same store); return once /healthz answers 200.

        A lone node of a cluster is healthy before it has routes: NatsCluster.wait_formed().
        """
        exe = find_executable("nats-server", NATS_INSTALL)
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [exe, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            # /healthz waits for JetStream, which waits for the other nodes: /varz only
            wait_for_http(f"{self.monitor_url}/varz", 200, 10.0, self._proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def monitor(self, path: str) -> dict[str, Any]:
        """GET a monitoring endpoint, e.g. "/jsz?streams=true", as JSON."""
        resp = httpx.get(f"{self.monitor_url}{path}", trust_env=False, timeout=5.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result


class NatsCluster:
    """Three NatsNodes (n1, n2, n3) forming one JetStream cluster; urls for a client."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, name: str = "c") -> None:
        self._workdir = _Workdir(workdir, "nats-cluster-")
        self.name = name
        self.nodes = [NatsNode(self._workdir.dir, f"n{i}") for i in (1, 2, 3)]
        for node in self.nodes:
            node.write_config(name, [p for p in self.nodes if p is not node])

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in cluster {self.name} (nodes n1, n2, n3)")

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            self.wait_formed()
        except BaseException:
            self.close()
            raise
        return self

    def wait_formed(self, timeout: float = 30.0) -> None:
        """Until each running node routes to the other running ones and sees a running meta
        leader (the JetStream API, stream creation included, waits for that leader)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [node.name for node in self.nodes if node.running and not self._formed(node)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = "".join(_log_tail(n.log_path, 1500) for n in self.nodes)
                raise RuntimeError(
                    f"NATS cluster {self.name}: {waiting} not formed within {timeout}s{logs}"
                )
            time.sleep(0.05)

    def _formed(self, node: NatsNode) -> bool:
        try:
            routes = node.monitor("/routez").get("routes") or []
            meta = node.monitor("/jsz").get("meta_cluster") or {}
        except httpx.HTTPError:
            return False
        routed = {r.get("remote_name") for r in routes}
        running = {n.name for n in self.nodes if n.running}
        return (
            running - {node.name} <= routed
            and meta.get("cluster_size") == 3
            and meta.get("leader") in running
        )

    def stream_leader(self, stream: str, timeout: float = 15.0) -> NatsNode:
        """The running node that leads stream (waits for an election after a kill)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self._reported_leader(stream)
            if leader is not None and leader.running:
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"stream {stream!r} has no leader on a running node")
            time.sleep(0.05)

    def _reported_leader(self, stream: str) -> NatsNode | None:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                jsz = node.monitor("/jsz?accounts=true&streams=true&config=true")
            except httpx.HTTPError:
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader:
                        return self.node(leader)
        return None

    def kill(self, node: NatsNode) -> None:
        """SIGKILL node (its store stays) and wait until the others have a leader again."""
        node.kill()
        self.wait_formed()

    def restart(self, node: NatsNode) -> None:
        """Start a killed or stopped node again, with its store, and wait for it to rejoin."""
        node.start()
        self.wait_formed()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self._workdir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
