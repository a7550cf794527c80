"""Turning measurements into the table, the ratios, the target verdicts and docs/performance.md.

Pure functions of the run's data (a dict, also what ``bench/results/latest.json`` holds), so they
are testable without running anything.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Scenario names, in the order they run and are shown.
ORDER = ("direct", "nginx", "mitmdump", "floor", "full", "asyncio", "routes10k", "workers2",
         "ratelimit", "ratelimit_redis", "query_base", "query", "body_base", "body")
LABELS = {
    "full": "stagedoor, full policy (1 worker)",
    "asyncio": "stagedoor, full policy, asyncio loop (no uvloop)",
    "routes10k": "stagedoor, 10,000 routes (1 worker)",
    "workers2": "stagedoor, full policy, --workers 2",
    "ratelimit": "stagedoor, full policy + rateLimit (memory)",
    "ratelimit_redis": "stagedoor, full policy + rateLimit (Redis)",
    "query_base": "stagedoor, GET with a query, no query rules",
    "query": "stagedoor, GET with a query, validated (query:)",
    "body_base": "stagedoor, POST with a JSON body, no body rule",
    "body": "stagedoor, POST with a JSON body, validated (body: schema)",
}
#: Features that must cost at most 5% on a scenario of their own: scenario -> (the same
#: request without the feature, what the feature is). Scenarios not in a run show as "not
#: measured".
COST_SCENARIOS: dict[str, tuple[str, str]] = {
    "ratelimit": ("full", "policy rate limit (memory store)"),
    "query": ("query_base", "query validation"),
    "body": ("body_base", "body validation (JSON Schema)"),
}
MAX_FEATURE_COST = 0.05
#: Issue 18's targets.
WANT_VS_MITMDUMP = 2.2
WANT_CPU_VS_MITMDUMP = 0.45
WANT_VS_FLOOR = 0.85
WANT_ROUTES = 0.95
WANT_WORKERS2 = 1.6
RSS_GROWTH_MIB = 20.0
MIB = 1024.0


@dataclass(frozen=True)
class Verdict:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: could not be measured
    detail: str


# -- machine -------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(args: list[str], pattern: str) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else None


def machine_info(nginx: str | None, wrk: str | None) -> dict[str, Any]:
    from mitmproxy import version as mitmproxy_version

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy_version.VERSION,
        "nginx": _version([nginx, "-v"], r"nginx/(\S+)") if nginx else None,
        "wrk": _version([wrk, "--version"], r"wrk (\S+)") if wrk else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "event_loop": _event_loop(),
    }


def _event_loop() -> str:
    """The loop ``stagedoor run`` takes here by default (the bench forces none but one)."""
    from stagedoor.eventloop import EventLoopError, choose

    try:
        return choose(None, env={}).reason
    except EventLoopError as exc:  # pragma: no cover - only with a broken install
        return str(exc)


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


# -- aggregation ---------------------------------------------------------------------------------
def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one scenario -> medians (a single round is itself)."""
    cpus = [r["cpu"] for r in rounds if r.get("cpu")]
    cpu = {}
    for key in (cpus[0] if cpus else {}):
        values = [c[key] for c in cpus if c.get(key) is not None]
        cpu[key] = round(statistics.mean(values), 3) if values else None
    return {
        "cpu": cpu,
        "rps": round(statistics.median(r["rps"] for r in rounds), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in rounds), 3),
        "requests": sum(r["requests"] for r in rounds),
        "non_2xx": sum(r["non_2xx"] for r in rounds),
        "socket_errors": sum(r["socket_errors"] for r in rounds),
        "rounds": rounds,
    }


def _rps(run: dict[str, Any], name: str) -> float | None:
    scenario = run["scenarios"].get(name)
    return scenario["rps"] if scenario else None


def ratios(run: dict[str, Any]) -> dict[str, float]:
    pairs = {
        "full_vs_mitmdump": ("full", "mitmdump"),
        "full_vs_floor": ("full", "floor"),
        "floor_vs_mitmdump": ("floor", "mitmdump"),
        "full_vs_asyncio": ("full", "asyncio"),
        "ratelimit_redis_vs_full": ("ratelimit_redis", "full"),
        "routes10k_vs_full": ("routes10k", "full"),
        "workers2_vs_full": ("workers2", "full"),
        "full_vs_nginx": ("full", "nginx"),
        "workers2_vs_nginx": ("workers2", "nginx"),
        "full_vs_direct": ("full", "direct"),
        "mitmdump_vs_direct": ("mitmdump", "direct"),
    }
    pairs.update({f"{name}_vs_{base}": (name, base) for name, (base, _) in COST_SCENARIOS.items()})
    out = {}
    for key, (a, b) in pairs.items():
        ra, rb = _rps(run, a), _rps(run, b)
        if ra and rb:
            out[key] = round(ra / rb, 3)
    full, stock = _cpu_us(run, "full"), _cpu_us(run, "mitmdump")
    if full and stock:
        out["cpu_full_vs_mitmdump"] = round(full / stock, 3)
    return out


def _cpu_us(run: dict[str, Any], name: str) -> float | None:
    """Proxy CPU µs per request of one scenario, or None."""
    scenario = run["scenarios"].get(name) or {}
    return (scenario.get("cpu") or {}).get("proxy_us_per_request")


def verdicts(run: dict[str, Any]) -> list[Verdict]:
    """Issue 18's targets, measured (ratios from this one run)."""
    s = run["scenarios"]
    r = run["ratios"]
    out = []

    def missing(name: str, wanted: str, why: str = "scenario skipped") -> None:
        out.append(Verdict(name, wanted, "not measured", None, why))

    name = "full policy vs stock mitmdump"
    wanted = f">= {WANT_VS_MITMDUMP:.2f}x req/s, p99 no worse"
    if "full_vs_mitmdump" in r:
        ratio = r["full_vs_mitmdump"]
        p99, stock_p99 = s["full"]["p99_ms"], s["mitmdump"]["p99_ms"]
        out.append(Verdict(
            name, wanted, f"{ratio:.2f}x req/s, p99 {p99:.1f} ms vs {stock_p99:.1f} ms",
            ratio >= WANT_VS_MITMDUMP and p99 <= stock_p99,
            _margin(ratio, WANT_VS_MITMDUMP) + (f"; p99 {'better' if p99 <= stock_p99 else 'worse'}"
                                                f" by {abs(stock_p99 - p99):.1f} ms")))
    else:
        missing(name, wanted)

    name, wanted = ("CPU per request, full policy vs stock mitmdump",
                    f"<= {WANT_CPU_VS_MITMDUMP:.2f}x")
    if "cpu_full_vs_mitmdump" in r:
        ratio = r["cpu_full_vs_mitmdump"]
        out.append(Verdict(name, wanted, f"{ratio:.2f}x ({_cpu_us(run, 'full'):.0f} µs vs "
                                         f"{_cpu_us(run, 'mitmdump'):.0f} µs)",
                           ratio <= WANT_CPU_VS_MITMDUMP, _margin_below(ratio,
                                                                         WANT_CPU_VS_MITMDUMP)))
    else:
        missing(name, wanted)

    name = "full policy vs the floor (no stagedoor addons)"
    wanted = f">= {WANT_VS_FLOOR:.2f}x req/s"
    if "full_vs_floor" in r:
        ratio = r["full_vs_floor"]
        out.append(Verdict(name, wanted, f"{ratio:.2f}x", ratio >= WANT_VS_FLOOR,
                           _margin(ratio, WANT_VS_FLOOR)))
    else:
        missing(name, wanted)

    name, wanted = "10,000 routes vs the 2-route policy", f">= {WANT_ROUTES:.2f}x req/s"
    if "routes10k_vs_full" in r:
        ratio = r["routes10k_vs_full"]
        out.append(Verdict(name, wanted, f"{ratio:.2f}x", ratio >= WANT_ROUTES,
                           _margin(ratio, WANT_ROUTES)))
    else:
        missing(name, wanted)

    name = "--workers 2 vs --workers 1"
    wanted = f">= {WANT_WORKERS2:.2f}x req/s (on an idle host)"
    if "workers2_vs_full" in r:
        ratio = r["workers2_vs_full"]
        out.append(Verdict(name, wanted, f"{ratio:.2f}x (CPU scaling probe {_scaling(run)})",
                           ratio >= WANT_WORKERS2, _margin(ratio, WANT_WORKERS2)))
    else:
        missing(name, wanted)

    for scenario, (base, what) in COST_SCENARIOS.items():
        name, wanted = f"{what}: cost on its own scenario", f"<= {MAX_FEATURE_COST:.0%} req/s"
        key = f"{scenario}_vs_{base}"
        if key in r:
            cost = 1 - r[key]
            out.append(Verdict(name, wanted, f"{cost:+.1%} ({r[key]:.3f}x of the same request "
                                             f"without it)", cost <= MAX_FEATURE_COST,
                               f"{(MAX_FEATURE_COST - cost) * 100:.1f} points to spare"
                               if cost <= MAX_FEATURE_COST else
                               f"{(cost - MAX_FEATURE_COST) * 100:.1f} points over"))
        else:
            missing(name, wanted)

    memory = run.get("memory") or {}
    points = memory.get("points") or []
    if len(points) >= 2:
        first, last = points[0], points[-1]
        growth = (last["rss_kib"] - first["rss_kib"]) / MIB
        start = memory.get("start_kib")
        out.append(Verdict(
            f"RSS after {last['requests']:,} vs after {first['requests']:,} requests",
            f"within {RSS_GROWTH_MIB:.0f} MiB (flat)",
            f"{growth:+.1f} MiB ({first['rss_kib'] / MIB:.1f} -> {last['rss_kib'] / MIB:.1f} MiB"
            + (f"; {start / MIB:.1f} MiB at start" if start else "") + ")",
            abs(growth) <= RSS_GROWTH_MIB,
            f"{RSS_GROWTH_MIB - abs(growth):.1f} MiB to spare" if abs(growth) <= RSS_GROWTH_MIB
            else f"{abs(growth) - RSS_GROWTH_MIB:.1f} MiB over"))
    else:
        missing("resident memory growth", f"within {RSS_GROWTH_MIB:.0f} MiB (flat)",
                "memory phase skipped")
    return out


def _margin_below(value: float, limit: float) -> str:
    if value <= limit:
        return f"met with {(1 - value / limit) * 100:.0f}% to spare"
    return f"missed by {(value / limit - 1) * 100:.0f}% (needs {value / limit:.2f}x less)"


def _margin(value: float, wanted: float) -> str:
    if value >= wanted:
        return f"met with {(value / wanted - 1) * 100:.0f}% to spare"
    return f"missed by {(1 - value / wanted) * 100:.0f}% (needs {wanted / value:.2f}x more)"


# -- text ----------------------------------------------------------------------------------------
def table(run: dict[str, Any]) -> str:
    """A plain-text table of the scenarios and their ratios."""
    s = run["scenarios"]
    base = _rps(run, "mitmdump")
    one = _rps(run, "full")
    lines = [f"{'scenario':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x mitmdump':>10} "
             f"{'x stagedoor':>11} {'errors':>7} {'proxy CPU':>9} {'us/req':>7} {'other':>6}"]
    for name in ORDER:
        if name not in s:
            continue
        row = s[name]
        errors = row["non_2xx"] + row["socket_errors"]
        lines.append(
            f"{row['label'][:44]:<44} {row['rps']:>9,.0f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f} {_x(row['rps'], base):>10} {_x(row['rps'], one):>11} "
            f"{errors:>7} {_cpu(row, 'proxy'):>9} {_cpu(row, 'proxy_us_per_request'):>7} "
            f"{_cpu(row, 'other'):>6}")
    for name, reason in run.get("skipped", {}).items():
        lines.append(f"{name:<44} skipped: {reason}")
    return "\n".join(lines)


def _cpu(row: dict[str, Any], key: str) -> str:
    cpu = row.get("cpu") or {}
    value = cpu.get(key)
    if key == "proxy" and cpu.get("proxy_us_per_request") is None:
        value = None  # no proxy in this scenario (direct to the upstream)
    if value is None:
        return "-"
    return f"{value:.0f}" if key == "proxy_us_per_request" else f"{value:.2f}"


def _x(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def verdict_lines(items: list[Verdict]) -> str:
    lines = []
    for v in items:
        mark = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[v.met]
        lines.append(f"  [{mark}] {v.name}: wanted {v.wanted}, measured {v.measured} ({v.detail})")
    return "\n".join(lines)


def token_line(run: dict[str, Any]) -> str:
    """How the full-policy stagedoor verified its tokens (from its /metrics), or ''."""
    counts = run.get("token_verifications") or {}
    if not counts:
        return ""
    cached, verified = int(counts.get("cached", 0)), int(counts.get("ok", 0))
    others = {k: int(v) for k, v in counts.items() if k not in ("cached", "ok") and v}
    text = (f"Tokens in the full-policy run: {verified:,} signature verification(s), "
            f"{cached:,} answered from the verified-token cache")
    if others:
        text += " (" + ", ".join(f"{k}: {v:,}" for k, v in sorted(others.items())) + ")"
    return text + "."


def memory_lines(run: dict[str, Any]) -> str:
    points = (run.get("memory") or {}).get("points") or []
    return "\n".join(f"  after {p['requests']:>8,} requests: RSS {p['rss_kib'] / MIB:7.1f} MiB"
                     for p in points)


# -- docs/performance.md -------------------------------------------------------------------------
def _md_table(run: dict[str, Any]) -> str:
    s = run["scenarios"]
    base = _rps(run, "mitmdump")
    one = _rps(run, "full")
    rows = ["| scenario | req/s | p50 (ms) | p99 (ms) | x stock mitmdump | x stagedoor (1 worker) "
            "| errors | proxy CPU (cores) | proxy CPU per request (µs) | other processes (cores) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ORDER:
        if name not in s:
            continue
        row = s[name]
        rows.append(f"| {row['label']} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} | {_x(row['rps'], base)} | {_x(row['rps'], one)} | "
                    f"{row['non_2xx'] + row['socket_errors']} | {_cpu(row, 'proxy')} | "
                    f"{_cpu(row, 'proxy_us_per_request')} | {_cpu(row, 'other')} |")
    for name, reason in run.get("skipped", {}).items():
        rows.append(f"| {name} | skipped: {reason} | | | | | | | | |")
    return "\n".join(rows)


def _why(run: dict[str, Any], v: Verdict) -> str:
    """A plain explanation of each verdict, from what this run measured."""
    nproc = run["machine"].get("nproc") or 0
    noisy = _noisy(run)
    noise = (" Other work was running on this machine during the run (see the conditions "
             "above), which alone moves single figures by 10-20%." if noisy else "")
    if v.met is None:
        if v.name.startswith(("policy rate limit", "query", "body")) or "cost on" in v.name:
            return "Not measured in this run: the scenario is not part of it (the feature has " \
                   "not landed, or `--only` left it out)."
        return "Not measured in this run."
    if v.name.startswith("full policy vs stock"):
        base = ("Stock mitmdump dispatches every hook (eight per request, `update` included) to "
                "its ~35 default addons and runs on asyncio's own loop. The lean master "
                "(`addons/master.py`) loads the 5 addons a reverse proxy needs plus stagedoor's, "
                "dispatches each hook only to the handlers that exist (`addons/lean.py`) and "
                "runs on uvloop where installed (`stagedoor/eventloop.py`); it also drops "
                "mitmproxy's `__debug__`-only type check of every message "
                "(`MessageData.__post_init__`, `addons/lean.py`), which mitmdump keeps.")
        if v.met:
            return base + (" What is left per request is mostly mitmproxy's HTTP/1 machinery "
                           "(see the floor and the profile below).")
        floor = run["ratios"].get("floor_vs_mitmdump")
        return base + (" Even so, this run fell short. The floor (the same lean master with no "
                       "stagedoor addon) bounds what stagedoor can reach: full policy can never "
                       "be faster than the floor, so the ratio to mitmdump is at most the "
                       "floor's ratio"
                       + (f" ({floor:.2f}x in this run)" if floor else "")
                       + ", and the floor itself is mitmproxy's own per-request work (the "
                       "profile below)." + noise)
    if v.name.startswith("CPU per request"):
        return ("CPU time of the proxy process (its workers included) divided by the requests it "
                "answered in the same measurement: unlike req/s, it does not depend on how much "
                "of the two cores the proxy got, so it is the steadier of the two on a shared "
                "machine." + ("" if v.met else " The floor's CPU per request (in the results "
                              "table) is the lower bound for stagedoor on this mitmproxy.")
                + noise)
    if v.name.startswith("full policy vs the floor"):
        return ("The floor is `bench/floor.py`: the same mitmproxy, event loop, lean hook "
                "dispatch and proxy options as `stagedoor run`, forwarding every request as it "
                "is, with none of stagedoor's addons. The gap is stagedoor's own work per "
                "request: see the breakdown below." + noise)
    if v.name.startswith("10,000 routes"):
        if v.met:
            return ("Routes are a segment trie per plugin, so a lookup walks one node per path "
                    "segment whatever the number of routes. Once the proxy runs, everything "
                    "loaded is moved out of the garbage collector's full passes (`gc.freeze()`, "
                    "again after each reload), which otherwise walked all 10,000 routes and "
                    "showed up in the throughput and in p99. A few percent either way is noise.")
        return ("The lookup itself does not depend on the route count (segment trie), so a gap "
                "this size is noise or memory effects (a larger heap, colder CPU caches)."
                + noise)
    if v.name.startswith("--workers 2"):
        one = run["scenarios"]["full"].get("cpu") or {}
        two = run["scenarios"]["workers2"].get("cpu") or {}
        text = (f"This machine has {nproc} core(s), and wrk, the upstream and anything else "
                "running share them with the workers, so two workers cannot have two whole "
                "cores.")
        if one.get("proxy") is not None and two.get("proxy") is not None:
            helpers = (two.get("load_generator") or 0) + (two.get("upstream") or 0)
            text += (f" Measured: one worker used {one['proxy']:.2f} cores at "
                     f"{one.get('proxy_us_per_request') or 0:.0f} µs of CPU per request; two "
                     f"workers used {two['proxy']:.2f} cores at "
                     f"{two.get('proxy_us_per_request') or 0:.0f} µs per request, while wrk and "
                     f"the upstream took {helpers:.2f} cores and other processes "
                     f"{two.get('other') or 0:.2f}.")
        scaling = run.get("cpu_scaling") or {}
        if scaling:
            text += (" The CPU scaling probe (two CPU-bound Python processes against one, ideal "
                     f"2.00x) measured {_scaling(run)} before / after the load runs: that is "
                     "about the most two workers could get from the machine at the time.")
        history = [h for h in run.get("history") or [] if "workers2_vs_full" in h.get("ratios", {})]
        if len(history) > 1:
            text += (" In the recent runs listed above the ratio was "
                     + ", ".join(f"{h['ratios']['workers2_vs_full']:.2f}x" for h in history)
                     + ".")
        if v.met:
            return text
        return text + (" The workers scale with the cores they get; on a machine with more "
                       "free cores than workers plus load generator the ratio approaches 2x."
                       + noise)
    if "cost on" in v.name:
        return ("Measured side by side in this run: the same request through stagedoor with and "
                "without the feature (its own scenario row in the results)." + noise)
    return ("Nothing is kept per request once it is answered (flows are not stored; the "
            "verified-token cache, the error-page registry and the metrics' label sets are "
            "bounded), so resident memory levels off after warm-up." if v.met else
            "Resident memory kept growing under steady load: see the RSS figures above.")


def _load_before(run: dict[str, Any]) -> float:
    try:
        return float(str((run.get("load_average") or {}).get("before", "0")).split()[0])
    except (ValueError, IndexError):
        return 0.0


def history_entry(run: dict[str, Any]) -> dict[str, Any]:
    """What bench/results/history.jsonl keeps of one run."""
    return {"date": run["date"], "quick": run.get("quick", False),
            "load_before": _load_before(run),
            "cpu_scaling": run.get("cpu_scaling") or {},
            "rps": {name: s["rps"] for name, s in run["scenarios"].items()},
            "p99_ms": {name: s["p99_ms"] for name, s in run["scenarios"].items()},
            "ratios": run["ratios"],
            "met": [t["met"] for t in run["targets"]],
            "targets": len(run["targets"])}


def _history_table(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    rows = ["| run (UTC) | load before | CPU probe before / after | stagedoor req/s | "
            "x mitmdump | x floor | 10k routes x | workers 2 x | targets met |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for h in history:
        r = h.get("ratios", {})
        met = h.get("met", [])
        probe = h.get("cpu_scaling") or {}

        def ratio(key: str, r: dict[str, float] = r) -> str:
            return f"{r[key]:.2f}" if key in r else "-"
        rows.append(f"| {h['date']} | {h.get('load_before', 0):.2f} | "
                    + (" / ".join(f"{probe[k]:.2f}x" for k in ("before", "after") if k in probe)
                       or "-")
                    + f" | {h.get('rps', {}).get('full', 0):,.0f} | {ratio('full_vs_mitmdump')} "
                    f"| {ratio('full_vs_floor')} | {ratio('routes10k_vs_full')} | "
                    f"{ratio('workers2_vs_full')} | {sum(1 for x in met if x)} of {len(met)} |")
    return ("### Recent full runs\n\nThe same command, run again: how much the figures move "
            "from one run to the next on this machine. Runs before issue 18 had four targets "
            "(full policy >= 1.60x mitmdump among them) and no floor scenario.\n\n"
            + "\n".join(rows) + "\n")


def _scaling(run: dict[str, Any]) -> str:
    scaling = run.get("cpu_scaling") or {}
    if not scaling:
        return "not measured"
    return " / ".join(f"{scaling[k]:.2f}x" for k in ("before", "after") if k in scaling)


def _noisy(run: dict[str, Any]) -> bool:
    """Whether other work shared the cores: the CPU scaling probe says it best (a load average
    still decaying from work that just ended does not take a core); without a probe, the
    1-minute load average at the start."""
    probe = (run.get("cpu_scaling") or {}).get("before")
    if probe:
        return probe < 1.8
    return _load_before(run) >= 0.5


def _noise_note(run: dict[str, Any]) -> str:
    before = _load_before(run)
    note = (run.get("conditions") or "").strip()
    text = f"**Conditions of this run.** {note} " if note else "**Conditions of this run.** "
    text += (f"CPU scaling probe (two CPU-bound processes against one; 2.00x on two free cores) "
             f"{_scaling(run)} before / after the load runs; 1-minute load average "
             f"{before:.2f} at the start. ")
    if _noisy(run):
        return text + ("Other work shared the two cores with the benchmark, so single figures "
                       "carry noise of the order of 10-20% (the `other processes` column shows "
                       "how much CPU the rest of the machine took during each measurement). "
                       "Every scenario gets the same load, one after the other (and interleaved "
                       "when there are several rounds), so ratios suffer less than absolute "
                       "figures; CPU per request suffers least.")
    return text + ("The machine was otherwise idle when the run started (the probe saw two "
                   "free cores). Every scenario gets the "
                   "same load, one after the other (interleaved when there are several rounds).")


def _tool(machine: dict[str, Any]) -> str:
    if machine.get("wrk"):
        return f"wrk {machine['wrk']}"
    return "bench.load (bundled asyncio generator)"


def _rss_start_table(run: dict[str, Any]) -> str:
    rss = run.get("rss_start_kib") or {}
    if not rss:
        return ""
    rows = ["| process | RSS after start and one request (MiB) |", "| --- | ---: |"]
    for name in ORDER:
        if name in rss and name in run["scenarios"]:
            rows.append(f"| {run['scenarios'][name]['label']} | {rss[name] / MIB:.1f} |")
    return "\n".join(rows) + "\n"


def _breakdown_section(run: dict[str, Any]) -> str:
    from .breakdown import PIECES, attribute

    data = run.get("breakdown")
    if not data:
        return "Not measured in this run (`--breakdown-requests 0`).\n"
    labels = dict(PIECES)
    rows = ["| piece | CPU per request (µs) |", "| --- | ---: |"]
    rows += [f"| {labels.get(k, k)} | {v:.1f} |" for k, v in data["pieces_us"].items()]
    rows.append(f"| **sum of the pieces** | **{data['total_us']:.1f}** |")
    gap = attribute(data, _cpu_us(run, "full"), _cpu_us(run, "floor"))
    text = "\n".join(rows) + "\n\n"
    text += (f"Measured in process over {data['requests']:,} requests (thread CPU time around "
             "every stagedoor hook handler of a real lean master, and around `decide()`, the "
             "token cache and the head-limit check on their own; `bench/breakdown.py`).")
    if gap["gap_us"] is not None and gap["unexplained_us"] < 0:
        text += (f" In the load runs above the full-policy proxy used "
                 f"{_cpu_us(run, 'full'):.0f} µs of CPU per request and the floor "
                 f"{_cpu_us(run, 'floor'):.0f} µs: a gap of {gap['gap_us']:.0f} µs, less than "
                 f"the {gap['explained_us']:.0f} µs the pieces add up to in process. Both are "
                 "separate measurements on this machine under load: read the pieces as each "
                 "one's share of stagedoor's cost, not as an exact sum.")
    elif gap["gap_us"] is not None:
        text += (f" In the load runs above the full-policy proxy used "
                 f"{_cpu_us(run, 'full'):.0f} µs of CPU per request and the floor "
                 f"{_cpu_us(run, 'floor'):.0f} µs: a gap of {gap['gap_us']:.0f} µs, of which the "
                 f"pieces explain {gap['explained_us']:.0f} µs. The rest "
                 f"({gap['unexplained_us']:.0f} µs) is what running them costs inside the proxy "
                 "and is not in any one piece: the extra hook dispatch and awaits per flow, "
                 "flow metadata, larger headers on the wire, allocation and garbage collection, "
                 "colder CPU caches (and measurement noise: the two figures come from different "
                 "measurements).")
    return text + "\n"


def _profile_section(run: dict[str, Any]) -> str:
    prof = run.get("profile")
    if not prof:
        return ("Not recorded in this run: `./run.sh bench --profile` records one (py-spy, the "
                "`bench` extra).\n")
    svg = Path(prof.get("flamegraph", "docs/profile-full.svg")).name
    rows = ["| function (where) | code | self | total (inclusive) |",
            "| --- | --- | ---: | ---: |"]
    rows += [f"| `{r['function']}` | {r['category']} | {r['self_pct']:.1f}% | "
             f"{r['total_pct']:.1f}% |" for r in prof["top_self"]]
    cats = ", ".join(f"{k} {v:.1f}%" for k, v in prof["by_category_pct"].items())
    return (f"py-spy sampled the full-policy proxy for {prof['seconds']:g}s under the same load "
            f"({prof['samples']:,} samples while it served {prof['rps_while_sampled']:,.0f} "
            "req/s; `--nonblocking`, so the proxy was never paused; idle time excluded, and "
            f"{prof.get('waiting_samples_dropped', 0):,} samples of a helper thread that waits "
            "in native code, watchfiles' file watcher, which py-spy counts as running while "
            "/proc shows it at no CPU). "
            f"Flame graph: [{svg}]({svg}) (stagedoor's code in orange, mitmproxy's in blue).\n\n"
            f"![flame graph of the full-policy proxy]({svg})\n\n"
            "Top functions by self time (the share of samples where the function itself was "
            "running), with their inclusive share:\n\n" + "\n".join(rows) + "\n\n"
            f"Self time by where the code lives: {cats}. Stacks with a stagedoor frame anywhere "
            f"(its hooks and what they call): {prof['stagedoor_inclusive_pct']:.1f}% of the "
            "samples.\n")


def _shown_argv(argv: str) -> str:
    """The command line without ``--conditions TEXT`` (its text is shown under the machine)."""
    import shlex

    words = shlex.split(argv)
    shown: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--conditions":
            skip = True
        elif not word.startswith("--conditions="):
            shown.append(word)
    return shlex.join(shown) + (' --conditions "..."' if len(shown) < len(words) else "")


def render_markdown(run: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    from .targets import NOTE_BODY

    run = {**run, "history": history or []}
    m = run["machine"]
    cfg = run["settings"]
    items = [Verdict(**v) for v in run["targets"]]
    r = run["ratios"]
    met = sum(1 for v in items if v.met)
    stand = ""
    if "full_vs_nginx" in r:
        stand = (f"Against nginx as a reverse proxy (one worker process), stagedoor with the full "
                 f"policy does {r['full_vs_nginx'] * 100:.1f}% of nginx's requests/s"
                 + (f" ({r['workers2_vs_nginx'] * 100:.1f}% with two workers)"
                    if "workers2_vs_nginx" in r else "")
                 + ". That is the price of Python and of mitmproxy's per-request event machinery; "
                 "stagedoor is the fastest way we know to run mitmproxy as a gateway, not a "
                 "replacement for nginx where raw throughput is what matters.")
    if "full_vs_asyncio" in r:
        stand += (f"\n\nuvloop against asyncio's own loop, same code and policy: "
                  f"{r['full_vs_asyncio']:.2f}x req/s.")
    if "ratelimit_redis_vs_full" in r:
        stand += (f" A policy rate limit counted in Redis (one round trip to a local "
                  f"redis-server per request) runs at {r['ratelimit_redis_vs_full']:.2f}x the "
                  "full policy's req/s; issue 18 sets its 5% bound for the memory store.")
    memory = run.get("memory") or {}
    points = memory.get("points") or []
    memory_rows = "\n".join(f"| {p['requests']:,} | {p['rss_kib'] / MIB:.1f} |"
                            for p in points) or "| not measured in this run | |"
    if memory.get("start_kib"):
        memory_rows = f"| 0 (at start, listening) | {memory['start_kib'] / MIB:.1f} |\n" \
            + memory_rows
    load = run.get("load_average") or {}
    return f"""# Performance

Generated by `./run.sh bench{(' ' + _shown_argv(cfg['argv'])) if cfg.get('argv') else ''}` on
{run['date']} ({'quick run' if run.get('quick') else 'full run'}). Regenerate it with the same
command; the raw figures are in `bench/results/latest.json`. Nothing here is drawn or typed
by hand: the tables, the chart and the flame graph come from that run.

## Machine and conditions

| | |
| --- | --- |
| CPU | {m['cpu']} ({m['nproc']} cores) |
| memory | {m['memory_gib']} GiB |
| OS / kernel | {m['os']} / {m['kernel']} |
| Python | {m['python']} |
| mitmproxy | {m['mitmproxy']} |
| event loop | {m.get('event_loop') or 'uvloop where installed'} |
| nginx | {m.get('nginx') or 'not installed'} |
| load generator | {_tool(m)} |
| CPU scaling probe: 2 busy processes vs 1 (ideal 2.00), before / after | \
{_scaling(run)} |
| load average (1, 5, 15 min) before / after | {load.get('before', '?')} / \
{load.get('after', '?')} |

{_noise_note(run)}

## Method

- Request: `GET /api/insights/services/payments-api` with an ES256 Backstage user token
  (`Authorization: Bearer ...`), {cfg['connections']} keep-alive connections, one request in flight
  each, {cfg['threads']} load thread(s); {cfg['warmup']:g}s warm-up then {cfg['duration']:g}s
  measured per scenario, {cfg['rounds']} round(s) (medians shown). Everything on 127.0.0.1.
- Upstream: {run.get('upstream', '?')} on 127.0.0.1, serving the JWKS at
  `<backend.baseUrl>/api/auth/.well-known/jwks.json` and the service JSON everywhere else.
- **stagedoor (1 worker)**: `stagedoor run` with the shipped `policies/insights.yaml`: the token
  is verified (then served from the verified-token cache), `id` checked against its regex, the
  permission rule evaluated, the request rewritten to `/v1/services/payments-api`, an access-log
  line written (to a file), metrics counted.
- **floor**: `python -m bench.floor`, the lean master with no stagedoor addon (same mitmproxy,
  event loop, hook dispatch, proxy options), forwarding the request as it is.
- **asyncio loop**: the full-policy configuration with `STAGEDOOR_EVENT_LOOP=asyncio`.
- **10,000 routes**: the same plugin with 9,998 generated routes added (literal prefixes,
  parameters with patterns, routes sharing the `/services/{{id}}` prefix).
- **--workers 2**: the 1-worker configuration, `--workers 2`.
- **rateLimit**: the full policy plus a plugin-wide `rateLimit` rule keyed on the principal,
  with a limit never reached (every request is counted, none refused); in memory, and in a
  redis-server on 127.0.0.1.
- **query / body validation**:
  `GET /api/insights/services/payments-api?window=30d&limit=20&tag=slo&tag=docs`
  to the `/services/{{id}}` route with three `query:` rules (one repeated) against the same
  request to the route without them (the query is then dropped);
  `POST /api/insights/services/payments-api/notes`
  with a {len(NOTE_BODY)}-byte JSON body against a route with a `body:` JSON Schema and one
  without (the body forwarded unchecked). Each pair differs only in the rules.
- **stock mitmdump**: `mitmdump --mode reverse:<upstream> -q`, forwarding as is.
- **nginx**: `proxy_pass` with upstream keep-alive, `worker_processes 1`.
- Proxy CPU: user + system time of the proxy process (and its workers) during the measurement,
  from `/proc`; `other processes` is the rest of the machine's busy time, less the load generator
  and the upstream.

## Results

{_md_table(run)}

![requests/s and p99 per scenario](performance-chart.svg)

{stand}

{token_line(run)}

{_history_table(history or [])}
### Resident memory

{_rss_start_table(run)}
Over a long run (stagedoor, 1 worker, full policy, a fresh process):

| requests served | RSS (MiB) |
| ---: | ---: |
{memory_rows}

## Targets ({met} of {len(items)} met)

| target | wanted | measured | verdict |
| --- | --- | --- | --- |
""" + "\n".join(
        f"| {v.name} | {v.wanted} | {v.measured} | "
        f"{ {True: '**met**', False: '**missed**', None: 'not measured'}[v.met]} ({v.detail}) |"
        for v in items) + "\n\n" + "\n\n".join(
        f"**{v.name}.** {_why(run, v)}" for v in items) + f"""

## stagedoor's own cost, above the floor

{_breakdown_section(run)}
## Where the time goes: a sampling profile

{_profile_section(run)}
""" + STATIC_SECTIONS.replace("{cuts}", CUTS)


#: The parts of docs/performance.md that are not figures of the run (kept here so the file is
#: regenerated whole).
STATIC_SECTIONS = """\
## Scale-out: `--workers N` or N replicas

Both put N Python processes on N cores; neither makes one process faster.

- **`--workers N`** (`stagedoor/supervisor.py`): one pod, one port, N worker processes sharing
  the listening socket (`SO_REUSEPORT`; the kernel spreads connections). Costs: N times the
  memory of one worker (see RSS above), N token caches and N JWKS fetches (each worker verifies a
  token once), an admin listener per worker (port + index, so `/metrics` are per worker and a
  scrape must visit each), a policy rate limit with the memory store counts per worker (N times
  the limit in total: use the Redis store to share it). It needs N free cores in the pod:
  on a 2-core machine that also runs the load generator and the upstream, two workers get
  what the CPU scaling probe says, not 2x.
- **N replicas behind a Service**: N pods, each its own upstream + sidecar pair, Kubernetes
  spreading connections. Costs: N times everything in the pod (the upstream too), and a
  connection sticks to one pod (keep-alive), so a few busy clients can load pods unevenly.
  Nothing is shared between pods except through Redis (rate limits) or the upstream itself.
- Which one: `--workers` when the upstream is cheap and the sidecar is the bottleneck in the pod;
  replicas when the pair as a whole has to grow, or to survive a node. They combine.

## Cuts taken in issue 18, and their measured effect

""" + "{cuts}" + """

## What the hot path does per request

- Policies are parsed, validated and compiled once (at start and on reload); a request does a
  dict lookup for the plugin and walks a segment trie (one node per path segment), whatever the
  number of routes. Parameter regexes are compiled at load.
- Tokens: the first request with a token verifies its ES256 signature; later ones hit the
  verified-token cache (a SHA-256 of the token and an LRU lookup). The counts above come from the
  sidecar's own `/metrics`.
- No YAML parsing, regex compilation, JSON parsing or logging configuration happens per
  request (`tests/test_bench_hotpath.py` counts the calls through every addon of the lean
  master); the access-log line is one `json.dumps`, written with the lines around it.
- mitmproxy: the lean master (`addons/master.py`) loads core, proxy server, next layer, TLS
  config and error check plus stagedoor's addons. `addons/lean.py` dispatches each hook only to
  the handlers that exist. mitmproxy's `__debug__`-only type check of every request and
  response (`MessageData.__post_init__`) is dropped by `lean.skip_debug_type_checks`, only
  while it still behaves as a pure check (tests/test_lean.py); the floor drops it too.
  `python -O` would drop it through a public switch, but with it every `assert` and
  mitmproxy's event-type checks in its proxy layers: not used.
- The event loop is uvloop where installed (`stagedoor/eventloop.py`; `stagedoor.eventLoop` or
  `STAGEDOOR_EVENT_LOOP=asyncio` forces asyncio's).
- The gateway rewrites request and response headers in one pass over the raw header fields, and
  request ids come from a seeded PRNG instead of a `getrandom()` system call per request.
- After start-up and after every reload, everything loaded is frozen out of the garbage
  collector's full passes (`gc.freeze()`).
- `--workers N` runs N such processes on one port (`SO_REUSEPORT`), see
  `stagedoor/supervisor.py`.

## Reproduce

```console
$ ./run.sh bench --rounds 3 --profile   # what produced this file (~12 minutes)
$ ./run.sh bench --quick                # a smoke run, ~2 minutes
$ ./run.sh bench --only floor,full --duration 20 --rounds 3
$ ./run.sh bench --conditions "text"    # say what else ran on the machine, next to the figures
```

A full run writes `bench/results/latest.json` (and its history) and re-renders this file from
it. `--quick` writes only `bench/results/quick.json`, which git ignores (`--output FILE` for
another path), and leaves every tracked file as it is.

```sh
./run.sh bench --report-only          # re-render this file from bench/results/latest.json
```

`wrk` and `nginx` come from the distribution (`apt-get install -y wrk nginx`); without wrk a
bundled asyncio load generator is used, without nginx a bundled asyncio upstream and no nginx
row. `--profile` needs py-spy (`pip install -e '.[bench]'`; `./run.sh` installs it) and the
right to attach to a process (root, or `ptrace_scope` 0).
"""

#: What issue 18 changed, with the figures measured when each change was made: (cut, where,
#: before, after). Measured in process with thread CPU time, on the bench's own request.
CUT_ROWS = (
    ("uvloop as the event loop where installed", "`stagedoor/eventloop.py`", "asyncio",
     "see the asyncio-loop row of the results"),
    ("the explain trace built only when asked (engineer `core`)", "`stagedoor/decide.py`",
     "21.3 µs per `decide()`", "14.2 µs"),
    ("access-log lines written in batches (at most 50 ms or 256 lines, and at shutdown) "
     "instead of a write and a flush each", "`addons/accesslog.py`",
     "1.8 µs per line (write and flush to a file)", "0.3 µs"),
    ("a forwarded response's head finished once instead of twice; Host kept out of the fields "
     "while mitmproxy's host and port setters run (each rescanned and rewrote the headers)",
     "`addons/gateway.py`", "103 µs per request in the gateway's hooks", "74 µs"),
    ("the end of a request head found with two `bytes.find` instead of the `\\r?\\n\\r?\\n` "
     "regex; its lines counted in place, not copied", "`addons/mitm_internals.py` (limits)",
     "4.6 µs per 652-byte head", "1.2 µs"),
    ("`gc.freeze()` again after every reload (the young generations collected first, ~1 ms; "
     "the replaced state is freed by reference counting)",
     "`stagedoor/gcfreeze.py`, `addons/reload.py`",
     "a 63 ms full collection pass over 10,000 reloaded routes", "0 ms"),
    # The six below were measured on a heavily loaded shared machine (thread CPU time about
    # 2.5x an idle host's): read the ratios.
    ("the upstream request's header fields in one pass: names lowercased once, Host and "
     "X-Request-Id set in place during the pass (two more passes before)",
     "`stagedoor/forwarding.py`", "7.1-7.7 µs per request head", "4.8-5.8 µs"),
    ("a forwarded answer's header fields in one pass (the route's drops, hop-by-hop, security "
     "headers, X-Request-Id) instead of the response rules' pass and then the forwarding "
     "pass, which redid the hop-by-hop and security work; the route's dropped names "
     "computed once per rule", "`stagedoor/forwarding.py`, `addons/gateway.py`",
     "18.6-21.3 µs per answer", "5.0-5.7 µs"),
    ("X-Request-Id and Authorization read in one pass over the raw request fields and kept on "
     "the flow record (three `Headers.get_all` calls before, each rescanning the fields); the "
     "forward step without a guard coroutine and a lambda",
     "`addons/gateway.py`, `addons/record.py`", "5.8-6.2 µs per request head", "2.2-2.7 µs"),
    ("the permission step's texts (the 403 message, trace lines) built only when used",
     "`stagedoor/decide.py`", "25.0 µs per `decide()` with the token cache",
     "23.5 µs"),
    ("a route's body schema also compiled with jsonschema-rs, asked first whether the body is "
     "valid; jsonschema still decides and words every 400 (the fast validator runs jsonschema's "
     "own pattern, multipleOf and format code, and is never asked about patternProperties or "
     "numbers a 64-bit float cannot hold) (engineer `body`)", "`stagedoor/body.py`",
     "~145 µs per valid 117-byte note inside the hook pass; the whole POST 851 µs (600-660 µs "
     "on the same route without a body rule)", "the whole POST 619-740 µs"),
    ("the JSON decoder of request bodies built once instead of per call by `json.loads`; a "
     "faster guard regex (engineer `body`)", "`stagedoor/body.py`",
     "12.5 µs per `check_body()` (valid note)", "5.9 µs"),
    ("the upstream rewrite skips mitmproxy's host or port setter whose value is already there "
     "(each reruns the authority update; the one that runs last gives the same request): with "
     "the upstream on 127.0.0.1, where reverse mode already aimed the request, only the port "
     "setter runs (engineer `perf`)", "`addons/gateway.py`",
     "919.7k instructions per request", "896.8k"),
    ("each access-log line built as one dict in line order and encoded by the C JSON encoder "
     "built once (`JSONEncoder.encode` builds one per call); the same bytes, tested (engineer "
     "`perf`)", "`addons/accesslog.py`", "899.0k instructions per request", "878.1k"),
    ("a `Forward` decision carries the bearer token its principal was verified from (not shown, "
     "not compared), so the forward step does not run the Bearer regex over the token a second "
     "time (engineer `perf`)", "`stagedoor/decide.py`, `addons/gateway.py`",
     "878.1k instructions per request", "859.3k"),
    ("mitmproxy's `expected_http_body_size` (two header lookups, each rescanning and "
     "re-lowercasing every field) asked only when a request field can announce a body; a "
     "property test holds the shortcut to it (engineer `perf`)", "`addons/edge.py`",
     "859.3k instructions per request", "832.7k"),
    ("the request-head and answer-head checks for control bytes in field values by deleting "
     "them with `bytes.translate` and comparing lengths (the regex still locates the byte for "
     "the 400's message); a property test holds it to the regex", "`stagedoor/head.py`",
     "3.0 µs per 666 bytes of joined values (timeit)", "0.6 µs"),
    ("no `request` hook on the TLS config addon (it was a handler that returned at once, "
     "dispatched on every request)", "`addons/upstream_tls.py`", "one handler call per request",
     "none"),
)
CUTS = ("Each measured in process when it was made, with thread CPU time (the other work on the "
        "shared machine does not count), on the bench's own request; the load runs above "
        "measure the whole.\n\n| cut | where | before | after |\n| --- | --- | ---: | ---: |\n"
        + "".join(f"| {cut} | {where} | {before} | {after} |\n"
                  for cut, where, before, after in CUT_ROWS)
        + "\nThe six rows from the upstream request's header fields in one pass to the JSON "
        "decoder were measured on a heavily loaded shared machine (thread CPU time there ran "
        "about 2.5x an idle host's): compare each before with its after, not with the rows "
        "above.\n"
        + "\nThe last four rows count instructions instead (callgrind, collecting only around "
        "1,000 bench requests driven through the four flow hooks of a lean master in process, "
        "the request as wrk sends it, on a connection the edge tracks, the wall clock held "
        "still so that what is formatted once a second costs the same in every run; each after "
        "is its commit, each before the commit before it, the six runs side by side; the "
        "retarget() refactor between the first two rows: +2.2k). Together 919.7k -> 832.7k "
        "instructions per request (-9.5%); thread CPU time of the same drive, three "
        "interleaved runs each on the busy machine, 282 -> 240 µs per request (medians).\n"
        + "\nNo new private-internals patch: the head-end search is inside the limit wrapper "
        "that already existed (a property test holds it to the regex it replaces); the rest "
        "uses public APIs. With the access log in batches, a process killed outright (SIGKILL) "
        "loses at most its last 50 ms of access-log lines; SIGTERM writes them all.\n")
