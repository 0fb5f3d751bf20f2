"""Coverage-guided fuzzing (atheris) of lineproto's body check and of every Kafka encoder.

    python -m bench.fuzz TARGET SECONDS [CORPUS_DIR]

TARGET: lineproto, line_protocol, collectd_graphite, collectd_json, json, or all (each in
turn, SECONDS apiece). A target must never raise on any bytes, and every line it passes
on must be one that the body check takes whole (a string may hold a newline) and parse()
reads, with a timestamp influxd takes. A failure stops the run with the input that caused
it (atheris writes it to a crash-* file). Figures of the last runs: README, "Line protocol".
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from influx_spout import lineproto
from influx_spout.encoders import collectd_graphite, collectd_json, json_mapping, line_protocol

TARGETS: dict[str, Callable[[bytes], lineproto.Decoded]] = {
    "lineproto": lambda data: lineproto.check_body(data, lineproto.HTTP_REASONS, "s", 1 << 16),
    "line_protocol": line_protocol.make_decoder("ms"),
    "collectd_graphite": collectd_graphite.make_decoder(["datacenter", "host"]),
    "collectd_json": collectd_json.decode,
    "json": json_mapping.make_decoder(
        json_mapping.JsonMapping(
            measurement_field="name",
            tags=["host"],
            constant_tags={"src": "kafka"},
            timestamp="ts",
            timestamp_precision="s",
        )
    ),
}
# inputs the fuzzer starts from, so that it reaches the formats' deeper paths early
SEEDS = [
    b'cpu,host=a usage=1.5,n=2i,s="x y",b=t 1700000000\n m  f=1  \n# c\n',
    b"dc1.host1.cpu.load 0.5 1436357630\n",
    json.dumps(
        [
            {
                "host": "h",
                "plugin": "cpu",
                "type": "t",
                "values": [1],
                "dsnames": ["v"],
                "time": 1.5,
                "interval": 10,
            }
        ]
    ).encode(),
    json.dumps({"name": "m", "host": "h", "v": 1.5, "ts": 1700000000}).encode(),
]


def check(decoded: lineproto.Decoded) -> None:
    """What every target promises of what it passes on."""
    data = decoded.data
    assert data == b"" or data.endswith(b"\n"), data[-50:]
    lines = [line[:-1] for line in lineproto.lines(data)]  # a string may hold a newline
    assert len(lines) == decoded.lines, (len(lines), decoded.lines)
    for line in lines:
        assert lineproto.split_valid(line) == (line + b"\n", []), line
        parsed = lineproto.parse(line)
        assert parsed is not None, line
        if parsed.timestamp is not None:
            assert abs(parsed.timestamp) < lineproto.INT64_MAX, line


def run(target: str, seconds: int, corpus: list[str]) -> None:
    import atheris  # only the fuzz run needs it

    decode = TARGETS[target]
    atheris.instrument_all()  # every Python function loaded (not the C regex engines)
    if corpus:
        seeds = Path(corpus[0])
        seeds.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (seeds / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        check(decode(data))

    args = [sys.argv[0], f"-max_total_time={seconds}", "-max_len=4096", *corpus]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or (argv[0] not in TARGETS and argv[0] != "all"):
        print(__doc__, file=sys.stderr)
        return 2
    target, seconds, corpus = argv[0], int(argv[1]), argv[2:]
    if target != "all":
        for seed in SEEDS:
            check(TARGETS[target](seed))
        run(target, seconds, corpus)
        return 0
    for name in TARGETS:  # atheris runs one target a process
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "bench.fuzz", name, str(seconds), *corpus])
        print(f"fuzz {name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
