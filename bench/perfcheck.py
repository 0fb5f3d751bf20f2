"""./perfcheck: the micro-benchmarks of the working tree against a reference revision.

Runs `pytest -m benchmark tests/<size>` with pytest-benchmark on the working tree and on
the reference revision (checked out by `git worktree add` into a temporary folder,
removed afterwards), alternating the two sides --repeat times so that drift of a noisy
machine hits both alike. Benchmarks are matched by their full pytest name.

Each pytest run gives each benchmark a median over its rounds; a side's figure is the
lowest of its runs' medians. Noise on a shared machine only ever adds time, and it comes
in phases (another job takes a core for a while) that can spoil a whole run: the best
run's median is the figure least touched by it. A benchmark that looks --threshold (10%)
or more slower is run again, alone, --confirm more times on each side, and fails only
if it is still that much slower with those runs included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import REPO_ROOT

REF_FILE = REPO_ROOT / ".perfcheck-ref"
SIZES = ("small", "medium", "large")

# pytest exit codes
TESTS_FAILED = 1
NO_TESTS = 5


class PerfcheckError(Exception):
    """A problem that stops the comparison; str() is the message for the user."""


@dataclass
class Side:
    label: str  # "old" or "new"
    root: Path
    rev: str
    # fullname -> the median time (seconds) of each pytest run
    medians: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # notes on failed pytest runs
    missing: list[str] = field(default_factory=list)  # sizes with no tests folder on this side


def git(*args: str, cwd: Path = REPO_ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PerfcheckError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def reference(cli_ref: str | None) -> str:
    """The commit to compare against: --ref, else the hash in .perfcheck-ref."""
    if cli_ref:
        ref, origin = cli_ref, "--ref"
    elif REF_FILE.exists():
        ref, origin = REF_FILE.read_text().strip(), str(REF_FILE)
    else:
        raise PerfcheckError(
            f"no reference revision: {REF_FILE} is missing; create it with "
            "`git rev-parse HEAD > .perfcheck-ref` or pass --ref REV"
        )
    if not ref:
        raise PerfcheckError(f"{origin} is empty: it should hold one commit hash")
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except PerfcheckError:
        raise PerfcheckError(
            f"reference revision {ref!r} (from {origin}) is not a commit of this repository; "
            "fetch it, or pass another with --ref"
        ) from None


def run_side(
    side: Side, targets: list[str], out_dir: Path, run_no: int, args: argparse.Namespace
) -> None:
    """One pytest run of the benchmarks in targets (folders or node ids) on side."""
    report = out_dir / f"{side.label}-{run_no}.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "benchmark",
        "-q",
        "-p",
        "no:cacheprovider",
        # a module that fails to import costs its own benchmarks, not the others'
        "--continue-on-collection-errors",
        f"--benchmark-json={report}",
        f"--benchmark-min-rounds={args.min_rounds}",
        f"--benchmark-max-time={args.max_time}",
        "--benchmark-warmup=on",
        "--benchmark-warmup-iterations=3",
        *targets,
        *args.pytest_args,
    ]
    env = dict(os.environ)
    # the side's own code first, whatever is pip-installed (editable or not)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(side.root), env.get("PYTHONPATH")) if p)
    env.pop("PYTEST_ADDOPTS", None)
    what = " ".join(targets) if len(targets) <= 3 else f"{len(targets)} benchmarks"
    print(f"perfcheck: {side.label} ({side.rev[:12]}): pytest {what}", flush=True)
    proc = subprocess.run(cmd, cwd=side.root, env=env, capture_output=True, text=True)
    if proc.returncode == NO_TESTS:
        return
    if proc.returncode not in (0, TESTS_FAILED):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-20:]
        raise PerfcheckError(
            f"pytest on the {side.label} side ({side.root}) exited {proc.returncode}:\n"
            + "\n".join(tail)
        )
    if proc.returncode == TESTS_FAILED:
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        for note in failed or ["some benchmark tests failed (see pytest output)"]:
            if note not in side.failed:
                side.failed.append(note)
    if not report.exists():  # pytest-benchmark writes nothing when no benchmark ran
        return
    for bm in json.loads(report.read_text()).get("benchmarks", []):
        side.medians.setdefault(bm["fullname"], []).append(bm["stats"]["median"])


def check_imports(side: Side) -> None:
    """Make sure pytest on side imports side's influx_spout, not the installed one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(side.root), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", "import influx_spout; print(influx_spout.__file__)"],
        cwd=side.root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if out and not Path(out).resolve().is_relative_to(side.root.resolve()):
        raise PerfcheckError(
            f"the {side.label} side would import influx_spout from {out}, not from {side.root}"
        )


def _has(side: Side, size: str) -> bool:
    return any(name.startswith(f"tests/{size}/") for name in side.medians)


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


@dataclass
class Row:
    name: str
    old: float | None
    new: float | None

    @property
    def delta(self) -> float | None:
        if self.old is None or self.new is None or self.old <= 0:
            return None
        return (self.new - self.old) / self.old


def compare(old: Side, new: Side, threshold: float) -> tuple[list[Row], list[Row]]:
    """All rows (each side's best run median), and those threshold or more slower."""
    names = sorted(set(old.medians) | set(new.medians))
    rows = [
        Row(
            n,
            min(old.medians[n]) if n in old.medians else None,
            min(new.medians[n]) if n in new.medians else None,
        )
        for n in names
    ]
    slower = [r for r in rows if r.delta is not None and r.delta >= threshold]
    return rows, slower


def table(rows: list[Row], threshold: float) -> str:
    header = ("benchmark", "old", "new", "delta", "")
    body = []
    for r in rows:
        d = r.delta
        if r.old is None:
            verdict, delta = "new", ""
        elif r.new is None:
            verdict, delta = "removed", ""
        else:
            assert d is not None
            delta = f"{d * 100:+.1f}%"
            verdict = "SLOWER" if d >= threshold else ("faster" if d <= -threshold else "")
        body.append(
            (
                r.name,
                fmt_time(r.old) if r.old is not None else "-",
                fmt_time(r.new) if r.new is not None else "-",
                delta,
                verdict,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *body]):
        cells = [row[0].ljust(widths[0])] + [row[j].rjust(widths[j]) for j in (1, 2, 3)]
        lines.append("  ".join(cells + [row[4]]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths[:4]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./perfcheck",
        description="Compare the micro-benchmarks of the working tree with a reference revision.",
    )
    parser.add_argument("sizes", nargs="+", choices=SIZES, help="test sizes whose benchmarks run")
    parser.add_argument("--ref", help=f"reference revision (default: the hash in {REF_FILE.name})")
    parser.add_argument(
        "--threshold", type=float, default=10.0, help="fail at this %% slower (default 10)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="old/new runs, alternating, per side (default 2)"
    )
    parser.add_argument(
        "--confirm", type=int, default=2, help="more runs per side for a suspect (default 2)"
    )
    parser.add_argument("--min-rounds", type=int, default=10, help="rounds per benchmark and run")
    parser.add_argument("--max-time", type=float, default=0.5, help="seconds per benchmark and run")
    parser.add_argument("--json", metavar="PATH", help="write the comparison as JSON")
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:  # what follows goes to pytest as it is
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.pytest_args = extra
    threshold = args.threshold / 100
    sizes = list(dict.fromkeys(args.sizes))

    try:
        ref = reference(args.ref)
    except PerfcheckError as exc:
        print(f"perfcheck: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="perfcheck-"))
    worktree = tmp / "ref"
    head = git("rev-parse", "HEAD")
    try:
        git("worktree", "add", "--detach", str(worktree), ref)
        old = Side("old", worktree, ref)
        new = Side("new", REPO_ROOT, f"{head} + working tree")
        check_imports(old)
        check_imports(new)
        for side in (old, new):
            side.missing = [s for s in sizes if not (side.root / "tests" / s).is_dir()]
        runs = 0
        for _ in range(max(1, args.repeat)):
            for side in (old, new):
                dirs = [f"tests/{s}" for s in sizes if s not in side.missing]
                if dirs:
                    run_side(side, dirs, tmp, runs, args)
                runs += 1
        _, suspects = compare(old, new, threshold)
        if suspects and args.confirm > 0:
            names = [r.name for r in suspects]
            print(f"perfcheck: confirming {len(names)} that look slower: {', '.join(names)}")
            for _ in range(args.confirm):
                for side in (old, new):
                    run_side(side, names, tmp, runs, args)
                    runs += 1
    except PerfcheckError as exc:
        print(f"perfcheck: {exc}", file=sys.stderr)
        return 2
    finally:
        for cmd in (["remove", "--force", str(worktree)], ["prune"]):
            subprocess.run(["git", "worktree", *cmd], cwd=REPO_ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nold: {ref[:12]} (reference)   new: {head[:12]} + working tree")
    print(
        f"each side: the lowest of its runs' medians ({max(1, args.repeat)} alternating runs"
        f"{f', {args.confirm} more for any that looked slower' if args.confirm else ''})\n"
    )
    code = 0
    if new.failed:
        print("perfcheck: benchmark tests FAILED in the working tree:", file=sys.stderr)
        print("\n".join(f"  {f}" for f in new.failed), file=sys.stderr)
        code = 1
    if old.failed:
        print("perfcheck: note: benchmark tests failed at the reference revision:")
        print("\n".join(f"  {f}" for f in old.failed))
    for side in (old, new):
        absent = [s for s in sizes if s in side.missing or not _has(side, s)]
        if absent:
            print(f"{side.label}: no benchmarks in tests/{', tests/'.join(absent)}")
    if not new.medians and not old.medians:
        print(f"no benchmarks in tests/{{{','.join(sizes)}}} on either side: nothing to compare")
        return code
    rows, slower = compare(old, new, threshold)
    print(table(rows, threshold))
    if not old.medians:
        print(
            f"\nthe reference revision {ref[:12]} has no {'/'.join(sizes)} benchmarks: "
            "nothing to compare against (every benchmark above is new)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "old": ref,
                    "new": f"{head}+worktree",
                    "threshold_pct": args.threshold,
                    "rows": [
                        {"name": r.name, "old_s": r.old, "new_s": r.new, "delta": r.delta}
                        for r in rows
                    ],
                },
                indent=2,
            )
            + "\n"
        )
    if slower:
        print(
            f"\nperfcheck: FAILED: {len(slower)} benchmark(s) {args.threshold:g}% or more slower "
            f"than {ref[:12]}: " + ", ".join(r.name for r in slower)
        )
        return 1
    if code == 0:
        print(f"\nperfcheck: OK: nothing {args.threshold:g}% or more slower than {ref[:12]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
