"""``./run.sh bench`` / ``python -m bench``: the side-by-side benchmark (see bench/__init__.py).

Bounded: every scenario runs ``--warmup`` + ``--duration`` seconds per round, the memory phase a
fixed number of requests (with a time cap), and every process is stopped at the end, on error and
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import load, report
from .procs import cpu_scaling, rss_kib, system_cpu_seconds, tree_cpu_seconds, which
from .targets import ROOT, Bench, Target

RESULTS = ROOT / "bench" / "results" / "latest.json"
HISTORY = ROOT / "bench" / "results" / "history.jsonl"  # the last few full runs, for the docs
HISTORY_KEEP = 5
DOCS = ROOT / "docs" / "performance.md"
ALL = ("direct", "nginx", "mitmdump", "full", "routes10k", "workers2")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./run.sh bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per scenario and round (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="unmeasured seconds before each measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every scenario this many times, interleaved; medians are "
                             "reported (default 1)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--memory", default="10000,50000,100000,200000", metavar="N,M,...",
                        help="memory phase: RSS after these many requests; the target compares "
                             "the first and the last (default 10000,50000,100000,200000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory phase")
    parser.add_argument("--only", default=",".join(ALL),
                        help=f"comma-separated scenarios (default: all of {','.join(ALL)})")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2s per scenario, 1s warm-up, memory 2000,10000,20000; "
                             "does not rewrite docs/performance.md unless --docs")
    parser.add_argument("--builtin-load", action="store_true",
                        help="use the bundled asyncio load generator even if wrk is installed")
    parser.add_argument("--no-nginx", action="store_true",
                        help="do not use nginx (bundled upstream, no nginx scenario)")
    parser.add_argument("--docs", dest="docs", action="store_true", default=None,
                        help="regenerate docs/performance.md (default unless --quick)")
    parser.add_argument("--no-docs", dest="docs", action="store_false")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON (default {RESULTS})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (configs, logs, access logs) after a good run")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: print and re-render docs/performance.md from the "
                             "JSON of the last run (and the history of full runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 2.0), min(args.warmup, 1.0)
        if args.memory == parser.get_default("memory"):
            args.memory = "2000,10000,20000"
    if args.docs is None:
        args.docs = not args.quick
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    try:
        args.memory_points = sorted({int(n) for n in args.memory.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--memory wants numbers, got {args.memory!r}")
    if args.duration <= 0 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be positive")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(bench: Bench, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, with where the CPU went meanwhile (in cores: 1.0 = one busy core)."""
    spec = load.Load(target.url, bench.headers, args.connections, args.threads)
    if args.warmup > 0:
        load.run(spec, args.warmup, force_builtin=args.builtin_load)
    proxy0 = tree_cpu_seconds(target.pid) if target.pid else 0.0
    upstream0 = tree_cpu_seconds(bench.upstream_pid) if bench.upstream_pid else 0.0
    children0 = _children_cpu()
    busy0 = system_cpu_seconds()
    started = time.monotonic()
    result = load.run(spec, args.duration, force_builtin=args.builtin_load).as_dict()
    wall = time.monotonic() - started
    busy = system_cpu_seconds() - busy0
    proxy = (tree_cpu_seconds(target.pid) - proxy0) if target.pid else 0.0
    upstream = (tree_cpu_seconds(bench.upstream_pid) - upstream0) if bench.upstream_pid else 0.0
    loadgen = _children_cpu() - children0 if not args.builtin_load else 0.0
    result["cpu"] = {
        "proxy": round(proxy / wall, 3) if target.pid else None,
        "upstream": round(upstream / wall, 3),
        "load_generator": round(loadgen / wall, 3),
        "other": round(max(0.0, busy - proxy - upstream - loadgen) / wall, 3),
        "machine_busy": round(busy / wall, 3),
        "proxy_us_per_request": round(proxy / result["requests"] * 1e6, 1)
        if target.pid and result["requests"] else None,
    }
    return result


def _children_cpu() -> float:
    """CPU time of every child this process has reaped (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_phase(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh 1-worker stagedoor; RSS after each requested count (chunks of new connections)."""
    target = bench.stagedoor("memory", "stagedoor (memory phase)")
    bench.preflight(target)
    assert target.pid is not None
    spec = load.Load(target.url, bench.headers, args.connections, args.threads)
    points = []
    served = 1  # the preflight
    chunk = max(1000, args.memory_points[0])
    deadline = time.monotonic() + 1800  # a hard cap, whatever the machine
    for wanted in args.memory_points:
        while served < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError("memory phase took longer than 30 minutes")
            step = min(chunk, wanted - served)
            # Every chunk opens fresh connections (the bundled generator counts exactly).
            result = load.run(spec, 600, requests=step)
            if result.requests == 0:
                raise RuntimeError("memory phase: no request got an answer")
            served += result.requests
        points.append({"requests": served, "rss_kib": rss_kib(target.pid)})
        say(f"  memory: {served:,} requests, RSS {points[-1]['rss_kib'] / 1024:.1f} MiB")
    bench.stop(target)
    return {"points": points}


def report_only(args: argparse.Namespace) -> int:
    run = json.loads(args.output.read_text())
    history: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        history = [json.loads(line) for line in HISTORY.read_text().splitlines() if line]
    print(report.table(run))
    print(report.verdict_lines(report.verdicts(run)))
    if args.docs:
        DOCS.write_text(report.render_markdown(run, history))
        say(f"wrote {DOCS} from {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    # SIGTERM ends the run like Ctrl-C: the finally below stops every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="stagedoor-bench-"))
    bench = Bench(workdir, use_nginx=not args.no_nginx)
    wrk = None if args.builtin_load else which("wrk")
    run: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "settings": {"duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
                     "connections": args.connections, "threads": args.threads,
                     "memory": args.memory_points,
                     "argv": shlex.join(sys.argv[1:] if argv is None else argv)},
        "machine": report.machine_info(bench.nginx, wrk),
        "load_average": {"before": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "scenarios": {},
        "skipped": {},
    }
    say(f"stagedoor bench: {run['machine']['nproc']} cores, {run['machine']['cpu']}; "
        f"load by {'wrk' if wrk else 'bench.load'}; work dir {workdir}")
    try:
        say("CPU scaling probe (two CPU-bound processes vs one) ...")
        run["cpu_scaling"] = {"before": cpu_scaling(sys.executable)}
        say(f"  {run['cpu_scaling']['before']:.2f}x (ideal 2.00)")
        bench.start_upstream()
        run["upstream"] = bench.upstream_kind
        targets: list[Target] = []
        for name in args.only:
            target: Target | None
            if name == "direct":
                target = bench.direct()
            elif name == "nginx":
                target = bench.nginx_proxy()
                if target is None:
                    run["skipped"]["nginx"] = ("nginx is not installed (apt-get install -y "
                                               "nginx)" if not args.no_nginx else "--no-nginx")
                    continue
            elif name == "mitmdump":
                target = bench.mitmdump()
            elif name == "full":
                target = bench.stagedoor("full", "stagedoor, full policy (1 worker)",
                                         admin=True)
            elif name == "routes10k":
                target = bench.stagedoor("routes10k", "stagedoor, 10,000 routes (1 worker)",
                                         routes=10_000)
            else:
                target = bench.stagedoor("workers2", "stagedoor, full policy, --workers 2",
                                         workers=2)
            bench.preflight(target)
            targets.append(target)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for number in range(1, args.rounds + 1):
            for target in targets:
                say(f"round {number}/{args.rounds}: {target.label} ...")
                result = measure(bench, target, args)
                rounds[target.name].append(result)
                say(f"  {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                    f"p99 {result['p99_ms']:.2f} ms"
                    + (f", {result['non_2xx']} non-2xx" if result["non_2xx"] else "")
                    + (f", {result['socket_errors']} socket errors"
                       if result["socket_errors"] else ""))
        for target in targets:
            run["scenarios"][target.name] = {"label": target.label,
                                             **report.summarize(rounds[target.name])}
        if "full" in rounds:  # evidence that the verified-token cache carries the load
            run["token_verifications"] = bench.token_verifications("full")
        run["cpu_scaling"]["after"] = cpu_scaling(sys.executable)
        say(f"CPU scaling probe after the load runs: {run['cpu_scaling']['after']:.2f}x")
        if not args.no_memory and args.memory_points:
            for target in targets:  # the memory phase runs alone
                bench.stop(target)
            say("memory phase ...")
            run["memory"] = memory_phase(bench, args)
    except BaseException:
        bench.close()
        say(f"work dir kept for inspection: {workdir}")
        raise
    bench.close()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    run["load_average"]["after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run["ratios"] = report.ratios(run)
    run["targets"] = [vars(v) for v in report.verdicts(run)]

    print()
    print(report.table(run))
    print()
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in run["ratios"].items()))
    scaling = run.get("cpu_scaling") or {}
    print("CPU scaling probe (2 processes vs 1, ideal 2.00): "
          + " / ".join(f"{k} {v:.2f}x" for k, v in scaling.items()))
    if report.token_line(run):
        print(report.token_line(run))
    if run.get("memory"):
        print("memory (stagedoor, 1 worker):")
        print(report.memory_lines(run))
    print("targets:")
    print(report.verdict_lines(report.verdicts(run)))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(run, indent=2) + "\n")
    say(f"\nwrote {args.output}")
    history: list[dict[str, Any]] = []
    if not args.quick and args.output == RESULTS:  # full runs with the default output only
        with contextlib.suppress(OSError, ValueError):
            history = [json.loads(line) for line in HISTORY.read_text().splitlines() if line]
        history = [*history, report.history_entry(run)][-HISTORY_KEEP:]
        HISTORY.write_text("".join(json.dumps(h) + "\n" for h in history))
    if args.docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(report.render_markdown(run, history))
        say(f"wrote {DOCS}")
    else:
        say("docs/performance.md left as it is (--quick or --no-docs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
