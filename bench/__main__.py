"""python -m bench SCENARIO|all ... [--lines N] [--seconds S] [--runs K] [--json [PATH]]

Runs each scenario K times (fresh servers and components every run), prints one line
per run and the medians, and with --json writes every figure (PATH, or stdout for '-').
Exit status: 0 when every scenario ran (lines lost are figures, not failures), 1 when
one could not run, 2 for a bad command line. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from bench import REPO_ROOT
from bench.scenarios import (
    SCENARIOS,
    Options,
    RunResult,
    mode_available,
    shared_influxd,
    workspace,
)


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def run_line(r: RunResult) -> str:
    main = r.components[r.main]
    parts = [
        f"{_fmt(r.lines_in)} in -> {_fmt(r.lines_out)} out in {r.seconds:.2f} s",
        f"{_fmt(r.lines_per_s)} lines/s (overall {_fmt(r.overall_lines_per_s)})",
        f"lost {_fmt(r.lost)} ({r.lost_pct:.3f}%)",
        f"{r.main}: {main.cpu_s_per_1m:.2f} CPU-s/1M lines, RSS {main.rss_mb:.0f} MB"
        + (
            f" (tree {main.rss_tree_mb:.0f} MB, PSS {main.pss_tree_mb:.0f} MB)"
            if main.processes > 1
            else ""
        ),
    ]
    for name, fig in r.components.items():
        if name != r.main:
            parts.append(f"{name}: {fig.cpu_s_per_1m:.2f} CPU-s/1M, RSS {fig.rss_mb:.0f} MB")
    server = r.details.get("nats_server")
    if server:
        parts.append(
            f"nats-server: {server['cpu_s_per_1m']:.2f} CPU-s/1M, RSS {server['rss_mb']:.0f} MB"
        )
    latency = r.details.get("load", {}).get("latency_ms")
    if latency:
        parts.append(f"POST p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms")
    if "offered_lines_per_s" in r.details:
        parts.append(f"offered {_fmt(r.details['offered_lines_per_s'])} lines/s")
    if "archive_lines" in r.details:
        parts.append(
            f"archive {_fmt(r.details['archive_lines'])} lines "
            f"for {_fmt(r.details['archive_series'])} series"
        )
    if r.details.get("first_line_after_s") is not None:
        parts.append(f"first line {r.details['first_line_after_s']:.1f} s after ready")
    bad_exits = {n: f.exit_code for n, f in r.components.items() if f.exit_code not in (0, None)}
    if bad_exits:
        parts.append(f"EXIT CODES {bad_exits}")
    if r.details.get("failures"):
        parts.append(f"counters {r.details['failures']}")
    load = r.details.get("load", {})
    if load.get("error_lines"):
        parts.append(f"HTTP errors {load['error_lines']} first: {load.get('first_error')}")
    if load.get("pushback"):
        parts.append(f"pushed back (503) {load['pushback']}x")
    return " | ".join(parts)


def summary(results: list[RunResult]) -> dict[str, Any]:
    first = results[0]
    out: dict[str, Any] = {
        "runs": len(results),
        "lines_per_s": statistics.median(r.lines_per_s for r in results),
        "overall_lines_per_s": statistics.median(r.overall_lines_per_s for r in results),
        "lost": statistics.median(r.lost for r in results),
        "lost_pct": statistics.median(r.lost_pct for r in results),
        "runs_with_loss": sum(1 for r in results if r.lost != 0),
        "components": {},
    }
    for name in first.components:
        figs = [r.components[name] for r in results if name in r.components]
        out["components"][name] = {
            "cpu_s_per_1m": statistics.median(f.cpu_s_per_1m for f in figs),
            "lines_per_cpu_s": statistics.median(
                1e6 / f.cpu_s_per_1m if f.cpu_s_per_1m else 0.0 for f in figs
            ),
            "rss_mb": max(f.rss_mb for f in figs),
            "rss_tree_mb": max(f.rss_tree_mb for f in figs),
            "pss_tree_mb": max(f.pss_tree_mb for f in figs),
        }
    if "offered_lines_per_s" in first.details:
        out["offered_lines_per_s"] = statistics.median(
            r.details["offered_lines_per_s"] for r in results
        )
    return out


def summary_line(name: str, s: dict[str, Any], main: str) -> str:
    m = s["components"][main]
    tree = ""
    if m["rss_tree_mb"] > m["rss_mb"]:
        tree = f" (tree {m['rss_tree_mb']:.0f} MB, PSS {m['pss_tree_mb']:.0f} MB)"
    text = (
        f"{name:14} median of {s['runs']}: {_fmt(s['lines_per_s'])} lines/s, "
        f"{m['cpu_s_per_1m']:.2f} CPU-s/1M lines ({_fmt(m['lines_per_cpu_s'])} lines/CPU-s) "
        f"of {main}, peak RSS {m['rss_mb']:.0f} MB{tree}, lost {s['lost_pct']:.3f}% "
        f"(runs with loss: {s['runs_with_loss']}/{s['runs']})"
    )
    if "offered_lines_per_s" in s:
        text += f", offered {_fmt(s['offered_lines_per_s'])} lines/s"
    return text


def machine() -> dict[str, Any]:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": rev,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark whole influx-spout components under generated load.",
        epilog="scenarios: "
        + "; ".join(f"{s.name}: {s.about}" for s in SCENARIOS.values())
        + "; all: every one of them but the soaks (minutes each: name them)",
    )
    parser.add_argument("scenario", nargs="+", choices=[*SCENARIOS, "all"])
    parser.add_argument("--lines", type=int, help="lines to offer per run (default per scenario)")
    parser.add_argument("--seconds", type=float, help="offer load for this long instead")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument(
        "--rate", type=float, help="lines/s offered (listener: default 500k; http: unlimited)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="HTTP connections of the pipeline scenarios' client (default 16)",
    )
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="write results as JSON ('-': stdout)"
    )
    parser.add_argument("--keep", action="store_true", help="keep configs and logs of the runs")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if "all" in args.scenario:
        names = [name for name in SCENARIOS if not name.startswith("soak")]
    else:
        names = list(dict.fromkeys(args.scenario))
    report = sys.stderr if args.json == "-" else sys.stdout

    results: dict[str, Any] = {"machine": machine(), "scenarios": {}}
    failed = False
    with workspace(args.keep) as work:
        for name in names:
            sc = SCENARIOS[name]
            missing = [m for m in sc.modes if not mode_available(m)]
            if missing:
                print(f"{name:14} skipped: mode {', '.join(missing)} not in this tree", file=report)
                results["scenarios"][name] = {"skipped": f"missing mode {', '.join(missing)}"}
                continue
            runs: list[RunResult] = []
            try:
                with shared_influxd(sc.needs_influxd, work / name) as influx:
                    for i in range(args.runs):
                        opts = Options(
                            lines=args.lines,
                            seconds=args.seconds,
                            rate=args.rate,
                            connections=args.connections,
                            workdir=work / name / f"run{i + 1}",
                        )
                        extra = (influx, i + 1) if sc.needs_influxd else ()
                        r = sc.run(opts, *extra)
                        runs.append(r)
                        print(f"{name:14} run {i + 1}/{args.runs}: {run_line(r)}", file=report)
                        report.flush()
            except Exception as exc:
                failed = True
                print(f"{name:14} FAILED: {exc}", file=report)
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
                results["scenarios"][name] = {
                    "error": str(exc),
                    "runs": [r.as_dict() for r in runs],
                }
                continue
            s = summary(runs)
            print(summary_line(name, s, runs[0].main), file=report)
            results["scenarios"][name] = {
                "about": sc.about,
                "median": s,
                "runs": [r.as_dict() for r in runs],
            }
    if args.json == "-":
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
