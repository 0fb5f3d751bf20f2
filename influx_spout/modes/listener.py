"""listener mode: UDP datagrams of line protocol -> batches -> one NATS subject.

Each datagram is taken as it is (the filter validates lines, not the listener), given a
final newline so that two datagrams' lines are never glued together, and added to one
Batcher: a batch is published to nats_subject[0] when it holds batch_max_count
datagrams, reaches batch_max_size (never above the NATS server's max payload), or is
batch_max_age old. Lines are never split across batches.

With durable = true the batches go into JetStream (bus.py), so that every hop after the
listener is durable; a batch lingers durable_linger at most. UDP itself promises its
senders nothing: a datagram lost before it is stored (kernel buffer, a crash, a full
stream) is lost.

UDP has no back-pressure: when NATS cannot take batches as fast as datagrams arrive,
ready batches of up to max(MAX_QUEUED_BYTES, QUEUED_BATCHES * batch size) bytes wait;
the datagrams beyond that are dropped and counted (failed_nats_publish), so memory
stays bounded. The bound is in bytes, not batches, so that small batches (the default
batch_max_count of 10 datagrams makes ~14 KB batches) still ride out a scheduling
hiccup of tens of milliseconds, as the kernel's receive buffer does.

The socket listens on every interface (IPv6 and IPv4 when the host has IPv6, as the Go
influx-spout did), with a receive buffer of read_buffer_size bytes.

Counters (the Go influx-spout's names keep its meanings; the _lines ones are ours):
  received                   datagrams received
  received_lines             lines in them (newline-terminated, as sent; not validated here)
  sent                       batches published to NATS
  sent_lines                 lines in them
  read_errors                errors the socket reported while receiving
  failed_nats_publish        batches NATS refused, and datagrams dropped while NATS lagged
  failed_nats_publish_lines  lines in them (or a line above NATS' max payload)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from influx_spout import jetstream
from influx_spout.batching import Batcher, ListenerMode, Parts, Pump, count_lines
from influx_spout.config import MB, Alias, Checker, Config, option
from influx_spout.mode import Host, Mode
from influx_spout.runtime import publish_parts_counted
from influx_spout.stats import Stats

# -- options (the shared ones, port and batch_* among them: config.SharedOptions) ----------


@dataclass(kw_only=True)
class Options:
    read_buffer_size: int = option(
        "size",
        4 * MB,
        "socket receive buffer: raise it for high peak rates",
        aliases=[Alias("read_buffer_bytes", "bytes")],
    )


def validate(c: Checker) -> None:
    """A UDP port, so probe_port (TCP) may be the same number."""
    c.listening_port(shared_with_probes=False)
    c.output_subject()
    jetstream.validate(c)


log = logging.getLogger("influx_spout.listener")

COUNTERS = (
    "received",
    "received_lines",
    "sent",
    "sent_lines",
    "read_errors",
    "failed_nats_publish",
    "failed_nats_publish_lines",
)

# every counter's meaning: the monitor's # HELP lines and the README's table
HELP = {
    "received": "datagrams received (as in the Go influx-spout)",
    "received_lines": "lines in them",
    "sent": "batches published to NATS (as in the Go influx-spout)",
    "sent_lines": "lines in them",
    "read_errors": "socket read errors",
    "failed_nats_publish": (
        "batches NATS refused, and datagrams dropped because too many batches waited for NATS"
    ),
    "failed_nats_publish_lines": "lines in them (or a line over NATS' max payload), not published",
}

# bytes of ready batches allowed to wait for NATS before datagrams are dropped: at
# least MAX_QUEUED_BYTES, and room for QUEUED_BATCHES full batches
MAX_QUEUED_BYTES = 4 * 1024 * 1024
QUEUED_BATCHES = 4


def open_socket(port: int, read_buffer_size: int, host: str = "") -> socket.socket:
    """A UDP socket bound to port of host ("": every interface), with the receive buffer
    asked for.

    A receive buffer smaller than asked (the kernel caps it at net.core.rmem_max) is
    logged, since datagrams that overflow it are lost without a trace.
    """
    sock, address = _unbound_socket(port, host)
    try:
        _set_receive_buffer(sock, read_buffer_size)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeError(
            f"cannot listen on UDP port {port} of {host or 'every interface'}: "
            f"{exc.strerror or exc} (is another process using it? check port and bind_address)"
        ) from exc
    sock.setblocking(False)
    return sock


def _unbound_socket(port: int, host: str) -> tuple[socket.socket, tuple]:
    """A UDP socket for host and port, and the address to bind it to."""
    if host:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM
            )[0]
        except socket.gaierror as exc:
            raise RuntimeError(
                f"cannot listen on UDP port {port} of {host}: {exc.strerror or exc} "
                "(check bind_address)"
            ) from exc
        return socket.socket(family, kind, proto), address
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock, ("::", port)
    except OSError:  # no IPv6 on this host
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("0.0.0.0", port)


def _set_receive_buffer(sock: socket.socket, size: int) -> None:
    # SO_RCVBUFFORCE passes the rmem_max cap when the process may (CAP_NET_ADMIN)
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    # Linux reports twice the usable size it granted (it reserves half for bookkeeping)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < size:
        log.warning(
            "UDP receive buffer is %d bytes, not the %d of read_buffer_size: datagrams may "
            "be lost at peak rates (raise net.core.rmem_max, e.g. sysctl -w "
            "net.core.rmem_max=%d)",
            granted,
            size,
            size,
        )


class UdpListener(asyncio.DatagramProtocol):
    """Batches datagrams as they arrive; its pump publishes the ready batches."""

    def __init__(self, cfg: Config, rt: Host) -> None:
        self.cfg = cfg
        self.rt = rt
        self.stats: Stats = rt.stats
        self.subject = cfg.nats_subject[0]
        # durable: what waits in RAM is not yet stored, so it waits durable_linger at most
        max_age = min(cfg.batch_max_age, cfg.durable_linger) if cfg.durable else cfg.batch_max_age
        batcher = Batcher(cfg.batch_max_count, min(cfg.batch_max_size, rt.bus.max_payload), max_age)
        self.pump = Pump(batcher, self.publish, confirmed=cfg.durable)
        self.max_queued = max(MAX_QUEUED_BYTES, QUEUED_BATCHES * batcher.max_size)
        # the counters of the per-datagram path, updated without Stats.inc's label handling
        self._values = self.stats.values
        self._received = ("received", ())
        self._received_lines = ("received_lines", ())
        self._failed = ("failed_nats_publish", ())
        self._failed_lines = ("failed_nats_publish_lines", ())
        self.transport: asyncio.DatagramTransport | None = None

    # -- asyncio.DatagramProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not data:
            return
        if data[-1] != 10:  # 10 == ord("\n"): never glue this datagram to the next
            data += b"\n"
        lines = count_lines(data)
        values = self._values
        values[self._received] += 1
        values[self._received_lines] += lines
        if self.pump.queued >= self.max_queued:
            values[self._failed] += 1
            values[self._failed_lines] += lines
            if self.cfg.debug:
                log.warning("dropped a datagram of %d lines from %s: NATS is lagging", lines, addr)
            return
        self.pump.add(data, lines)

    def error_received(self, exc: Exception) -> None:
        self.stats.inc("read_errors")
        log.warning("UDP receive error on port %d: %s", self.cfg.port, exc)

    # -- as a batching.Listener --------------------------------------------------------------

    async def open(self) -> None:
        cfg = self.cfg
        if cfg.durable:
            await self.rt.bus.ensure_streams([self.subject])
        sock = open_socket(cfg.port, cfg.read_buffer_size, cfg.bind_address)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        log.info(
            "listening on UDP port %d, publishing to %s at %s",
            cfg.port,
            self.subject,
            cfg.nats_address,
        )

    async def publish(self, batch: Parts) -> int:
        return await publish_parts_counted(self.rt, self.subject, batch, batches=True)

    async def close(self) -> None:
        """Stop receiving, then publish everything batched (raising what made the pump fail)."""
        if self.transport is not None:
            self.transport.close()
        await self.pump.close()


def make(cfg: Config) -> Mode:
    return ListenerMode(cfg, COUNTERS, UdpListener)
