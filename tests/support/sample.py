"""Realistic line protocol for tests and benchmarks: what Telegraf sends from a fleet."""

from __future__ import annotations

import random

# (measurement, field names) as Telegraf's common input plugins emit them.
_MEASUREMENTS: list[tuple[str, tuple[str, ...]]] = [
    ("cpu", ("usage_user", "usage_system", "usage_idle", "usage_iowait")),
    ("mem", ("used_percent", "available_percent", "cached", "buffered")),
    ("disk", ("used_percent", "inodes_used", "free", "total")),
    ("diskio", ("reads", "writes", "read_time", "write_time")),
    ("net", ("bytes_recv", "bytes_sent", "packets_recv", "err_in")),
    ("netstat", ("tcp_established", "tcp_time_wait", "tcp_listen", "udp_socket")),
    ("system", ("load1", "load5", "load15", "n_cpus")),
    ("processes", ("running", "sleeping", "zombies", "total")),
    ("swap", ("used_percent", "free", "in", "out")),
    ("kernel", ("context_switches", "interrupts", "processes_forked", "boot_time")),
    ("nginx", ("accepts", "active", "handled", "requests")),
    ("redis", ("clients", "used_memory", "keyspace_hits", "keyspace_misses")),
    ("postgresql", ("numbackends", "xact_commit", "blks_read", "tup_fetched")),
    ("docker", ("n_containers", "n_images", "memory_total", "n_cpus")),
    ("haproxy", ("scur", "smax", "stot", "bin")),
    ("http_response", ("response_time", "http_response_code", "result_code", "content_length")),
    ("ping", ("average_response_ms", "packets_received", "percent_packet_loss", "ttl")),
    ("procstat", ("cpu_usage", "memory_rss", "num_threads", "pid")),
    ("jvm", ("heap_used", "heap_max", "gc_count", "threads")),
    ("kafka", ("messages_in", "bytes_in", "bytes_out", "under_replicated")),
]
_DCS = ("eu-west-1", "eu-central-1", "us-east-1", "ap-south-1")
_TS = 1_700_000_000_000_000_000


def telegraf_lines(n: int, ts: int | None = None, seed: int = 0) -> list[bytes]:
    """n valid lines of about 180 bytes; deterministic for a seed.

    Each line has a timestamp: ts when given, else one second apart from 2023-11-14.
    Fields alternate floats and integers the way Telegraf writes them.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, fields = _MEASUREMENTS[rng.randrange(len(_MEASUREMENTS))]
        host = f"web{rng.randrange(1, 64):02d}.example.com"
        dc = _DCS[rng.randrange(len(_DCS))]
        tag = f"{name}{rng.randrange(8)}"
        rack = f"rack-{rng.randrange(1, 40):02d}"
        values = ",".join(
            f"{f}={rng.random() * 100:.2f}" if j % 2 == 0 else f"{f}={rng.randrange(10**6)}i"
            for j, f in enumerate(fields)
        )
        stamp = _TS + i * 1_000_000_000 if ts is None else ts
        tags = f"{name}={tag},host={host},dc={dc},rack={rack},env=production"
        out.append(f"{name},{tags} {values} {stamp}".encode())
    return out
