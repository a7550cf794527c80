"""The benchmark's own pure parts (bench/): parsing wrk, the statistics, the verdicts, the report,
the generated 10,000-route policy. Nothing here starts a process or measures anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import load, report
from bench.__main__ import parse_args
from bench.targets import generated_policy, nginx_config
from stagedoor.config import load_config
from stagedoor.policy import load_policies

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:7007/api/insights/services/payments-api
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.28ms    2.10ms  45.01ms   91.50%
    Req/Sec     1.43k    95.12     1.60k    70.00%
  Latency Distribution
     50%   10.95ms
     75%   11.80ms
     90%   12.90ms
     99%   21.40ms
  14253 requests in 10.01s, 11.02MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   1423.91
Transfer/sec:      1.10MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors():
    result = load.parse_wrk(WRK_OUTPUT)
    assert result.requests == 14253
    assert result.seconds == pytest.approx(10.01)
    assert result.rps == pytest.approx(1423.91)
    assert result.p50_ms == pytest.approx(10.95)
    assert result.p99_ms == pytest.approx(21.40)
    assert result.non_2xx == 3 and result.socket_errors == 0


def test_parse_wrk_converts_units():
    text = WRK_OUTPUT.replace("10.95ms", "635.91us").replace("21.40ms", "1.20s")
    result = load.parse_wrk(text + "  Socket errors: connect 1, read 2, write 0, timeout 4\n")
    assert result.p50_ms == pytest.approx(0.63591)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.socket_errors == 7


def test_parse_wrk_refuses_output_without_latency_distribution():
    with pytest.raises(ValueError):
        load.parse_wrk("Requests/sec: 1.0\n")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 0.50) == 50.0
    assert load.percentile(values, 0.99) == 99.0
    assert load.percentile([], 0.99) == 0.0
    assert load.percentile([7.0], 0.99) == 7.0


def _scenario(label: str, rps: float, p99: float) -> dict:
    one = {"requests": int(rps * 10), "seconds": 10.0, "rps": rps, "p50_ms": p99 / 2,
           "p99_ms": p99, "non_2xx": 0, "socket_errors": 0, "tool": "wrk",
           "cpu": {"proxy": 0.98, "upstream": 0.05, "load_generator": 0.07, "other": 0.1,
                   "machine_busy": 1.2, "proxy_us_per_request": 980000 / rps}}
    return {"label": label, **report.summarize([one])}


def _run(**rps: float) -> dict:
    run = {
        "date": "2026-11-25 12:00 UTC", "quick": False,
        "settings": {"duration": 10, "warmup": 3, "rounds": 1, "connections": 16, "threads": 1,
                     "memory": [10000, 200000], "argv": ""},
        "machine": {"nproc": 2, "cpu": "Test CPU", "kernel": "6.1", "os": "Debian",
                    "python": "3.12.1", "mitmproxy": "12.3.1", "nginx": "1.22.1",
                    "wrk": "4.1.0", "memory_gib": 24.0},
        "load_average": {"before": "0.1", "after": "0.2"},
        "cpu_scaling": {"before": 1.5, "after": 1.8},
        "upstream": "nginx",
        "scenarios": {name: _scenario(name, value, 20.0 if name != "mitmdump" else 40.0)
                      for name, value in rps.items()},
        "skipped": {},
        "memory": {"points": [{"requests": 10000, "rss_kib": 90 * 1024},
                              {"requests": 200000, "rss_kib": 95 * 1024}]},
    }
    run["ratios"] = report.ratios(run)
    run["targets"] = [vars(v) for v in report.verdicts(run)]
    return run


def test_summarize_takes_medians_of_rounds():
    rounds = [{"requests": 10, "rps": r, "p50_ms": 1.0, "p99_ms": p, "non_2xx": 0,
               "socket_errors": 1} for r, p in ((100.0, 5.0), (300.0, 9.0), (200.0, 7.0))]
    summary = report.summarize(rounds)
    assert summary["rps"] == 200.0 and summary["p99_ms"] == 7.0
    assert summary["requests"] == 30 and summary["socket_errors"] == 3


def test_verdicts_when_every_target_is_met():
    run = _run(direct=80000, nginx=30000, mitmdump=800, floor=2200, full=2000, routes10k=1980,
               workers2=3400, ratelimit=1950, query_base=2000, query=1990, body_base=1800,
               body=1750)
    verdicts = report.verdicts(run)
    assert [v.met for v in verdicts] == [True] * 9, [(v.name, v.detail) for v in verdicts]
    assert run["ratios"]["full_vs_mitmdump"] == pytest.approx(2.5)
    assert run["ratios"]["cpu_full_vs_mitmdump"] == pytest.approx(0.4)
    assert run["ratios"]["full_vs_floor"] == pytest.approx(0.909, abs=0.001)


def test_verdicts_say_by_how_much_a_target_is_missed():
    run = _run(mitmdump=1000, floor=2000, full=1500, routes10k=1200, workers2=2100)
    by_name = {v.name.split(",")[0]: v for v in report.verdicts(run)}
    assert by_name["full policy vs stock mitmdump"].met is False
    assert "missed by 32%" in by_name["full policy vs stock mitmdump"].detail
    cpu = by_name["CPU per request"]
    assert cpu.met is False and "0.67x" in cpu.measured and "needs 1.48x less" in cpu.detail
    assert by_name["full policy vs the floor (no stagedoor addons)"].met is False
    assert by_name["10"].met is False
    assert by_name["--workers 2 vs --workers 1"].met is False
    assert "CPU scaling probe 1.50x / 1.80x" in by_name["--workers 2 vs --workers 1"].measured


def test_unmeasured_targets_are_not_counted_as_met_or_missed():
    run = _run(full=1400)
    run["memory"] = None
    verdicts = report.verdicts(run)
    assert [v.met for v in verdicts] == [None] * 9


def test_a_feature_scenario_is_judged_against_the_same_request_without_it(monkeypatch):
    monkeypatch.setattr(report, "COST_SCENARIOS", {"limited": ("full", "policy rate limit")})
    run = _run(mitmdump=800, full=2000, limited=1920)
    verdict = next(v for v in report.verdicts(run) if v.name.startswith("policy rate limit"))
    assert verdict.met is True and "+4.0%" in verdict.measured
    run = _run(mitmdump=800, full=2000, limited=1880)
    verdict = next(v for v in report.verdicts(run) if v.name.startswith("policy rate limit"))
    assert verdict.met is False and "1.0 points over" in verdict.detail
    run = _run(mitmdump=800, full=2000)
    verdict = next(v for v in report.verdicts(run) if v.name.startswith("policy rate limit"))
    assert verdict.met is None


def test_table_and_markdown_name_every_scenario_and_target():
    run = _run(direct=80000, nginx=30000, mitmdump=800, floor=2200, full=1400,
               routes10k=1380, workers2=2100)
    run["memory"]["start_kib"] = 80 * 1024
    run["rss_start_kib"] = {"full": 85 * 1024, "floor": 70 * 1024}
    run["conditions"] = "seven test suites running"
    old = {"date": "2026-11-25 16:01 UTC", "quick": False, "load_before": 0.85,
           "rps": {"full": 1326.9}, "ratios": {"full_vs_mitmdump": 1.72},
           "met": [True, True, False, True]}
    text = report.table(run)
    assert "1.75x" in text and "floor" in text
    markdown = report.render_markdown(run, [old, report.history_entry(run)])
    for needle in ("Test CPU (2 cores)", "mitmproxy | 12.3.1", "2026-11-25 12:00 UTC",
                   "| 1,400 |", "**missed**", "2 of 9 met", "90.0", "95.0",
                   "| 0 (at start, listening) | 80.0 |", "| floor | 70.0 |",
                   "**Conditions of this run.** seven test suites running",
                   "Recent full runs", "| 2026-11-25 16:01 UTC | 0.85 | - | 1,327 | 1.72 | - |",
                   "| 2026-11-25 12:00 UTC | 0.10 | 1.50x / 1.80x | 1,400 | 1.75 | 0.64 |",
                   "one worker used 0.98 cores at 700 µs of CPU per request", "| 0.98 | 700 |",
                   "1.50x / 1.80x", "performance-chart.svg", "--workers N` or N replicas",
                   "Not recorded in this run"):
        assert needle in markdown, needle


def test_chart_is_svg_with_a_bar_per_scenario_and_cuts_the_far_ones():
    from xml.etree import ElementTree

    from bench.chart import chart_svg

    run = _run(direct=80000, mitmdump=800, floor=2200, full=2000)
    svg = chart_svg(run, report.ORDER)
    root = ElementTree.fromstring(svg)
    rects = [e for e in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(rects) == 1 + 2 * 4  # background + req/s and p99 per scenario
    assert "80,000 (off the scale)" in svg and "2,000" in svg


COLLAPSED = """\
<module> (/x/stagedoor/cli.py);run (/usr/lib/python3.12/asyncio/runners.py);\
request (/x/addons/gateway.py);decide (/x/stagedoor/decide.py) 30
<module> (/x/stagedoor/cli.py);run (/usr/lib/python3.12/asyncio/runners.py);\
write (/usr/lib/python3.12/asyncio/streams.py) 50
<module> (/x/stagedoor/cli.py);run (/usr/lib/python3.12/asyncio/runners.py);\
_handle_event (/v/site-packages/mitmproxy/proxy/layers/http/__init__.py) 20
"""


def test_profile_summary_and_flame_graph_from_collapsed_stacks():
    from xml.etree import ElementTree

    from bench import profile

    stacks = profile.parse_collapsed(COLLAPSED)
    assert len(stacks) == 3 and stacks[0][1] == 30
    summary = profile.summarize(stacks)
    assert summary["samples"] == 100
    top = summary["top_self"][0]
    assert top["function"] == "write (asyncio/streams.py)" and top["self_pct"] == 50.0
    assert summary["by_category_pct"] == {"event loop": 50.0, "stagedoor": 30.0,
                                          "mitmproxy": 20.0}
    assert summary["stagedoor_inclusive_pct"] == 30.0  # the entry point does not count
    assert profile.short_frame("_handle_event (/v/site-packages/mitmproxy/proxy/x.py)") \
        == "_handle_event (mitmproxy/proxy/x.py)"
    waiting = [(("_bootstrap (threading.py)", "WorkerThread.run (anyio/_backends/_asyncio.py)"),
                7)]
    assert profile.drop_waiting(stacks + waiting) == (stacks, 7)
    svg = profile.flamegraph_svg(stacks, "test")
    ElementTree.fromstring(svg)
    assert "decide (stagedoor/decide.py): 30 samples (30.0%)" in svg


def test_breakdown_attribution_and_wrk_script():
    from bench.breakdown import attribute

    gap = attribute({"total_us": 150.0}, full_us=700.0, floor_us=500.0)
    assert gap == {"gap_us": 200.0, "explained_us": 150.0, "unexplained_us": 50.0}
    assert attribute({"total_us": 150.0}, None, 500.0)["gap_us"] is None
    script = load.wrk_script(load.Load("http://127.0.0.1:1/x", (), method="POST",
                                       body=b'{"a": "b"}'))
    assert script == 'wrk.method = "POST"\nwrk.body = "{\\034a\\034: \\034b\\034}"\n'


def test_the_floor_only_forwards_to_loopback():
    from bench import floor

    with pytest.raises(SystemExit):
        floor.main(["--upstream", "http://10.0.0.1:80"])


def test_generated_policy_has_the_requested_number_of_valid_routes(tmp_path: Path):
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "insights.yaml").write_text(generated_policy(60))
    config_file = tmp_path / "app-config.yaml"
    config_file.write_text("insights:\n  externalApiUrl: http://127.0.0.1:9\n")
    policies = load_policies(policy_dir, load_config([str(config_file)]))
    assert policies.route_count == 60


def test_nginx_config_keeps_everything_under_its_prefix(tmp_path: Path):
    text = nginx_config(tmp_path, "  server { listen 127.0.0.1:1; }")
    assert f"pid {tmp_path}/nginx.pid;" in text
    assert "worker_processes 1;" in text and "access_log off;" in text
    assert text.count(str(tmp_path)) >= 7


def test_quick_is_short_and_leaves_the_docs_alone():
    args = parse_args(["--quick"])
    assert args.duration <= 2 and args.warmup <= 1 and args.docs is False
    assert args.memory_points == [2000, 10000, 20000]
    full = parse_args([])
    assert full.docs is True and full.memory_points[0] == 10000
    assert full.memory_points[-1] == 200000


def test_quick_writes_only_an_untracked_file_or_the_one_given():
    from bench.__main__ import QUICK_RESULTS, RESULTS, ROOT

    assert parse_args(["--quick"]).output == QUICK_RESULTS
    assert parse_args([]).output == RESULTS
    assert parse_args(["--quick", "--output", "/tmp/x.json"]).output == Path("/tmp/x.json")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(QUICK_RESULTS)], cwd=ROOT,
                             timeout=30)
    assert ignored.returncode == 0, f"{QUICK_RESULTS} must be git-ignored"


def test_unknown_scenarios_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--only", "full,nonsense"])


def test_split_message_frames_by_content_length():
    from bench.http1 import split_message

    assert split_message(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab") is None
    assert split_message(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    head, rest = split_message(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcGET /")
    assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 3" and rest == b"GET /"


def test_bundled_load_generator_against_bundled_upstream(tmp_path: Path):
    """The fallback pair (no wrk, no nginx) measures real requests on 127.0.0.1."""
    import socket
    import subprocess
    import sys
    import time

    from bench.load import Load, run_builtin

    (tmp_path / "body.json").write_text('{"ok":true}')
    (tmp_path / "jwks.json").write_text('{"keys":[]}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bench.fastserver", "--port", str(port),
                               "--body", str(tmp_path / "body.json"),
                               "--jwks", str(tmp_path / "jwks.json")],
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        result = run_builtin(Load(f"http://127.0.0.1:{port}/x", (), connections=2), 0.5,
                             requests=200)
        assert result.requests >= 200, result
        assert result.non_2xx == 0 and result.socket_errors == 0, result
    finally:
        server.terminate()
        server.wait(10)


def test_validation_scenarios_differ_only_in_their_rules(tmp_path: Path):
    """The query/body validation scenarios: the same routes, with and without the rules."""
    from bench.targets import NOTE_BODY, QUERY_TARGET, Bench
    from stagedoor.runtime import load_state

    bench = Bench(tmp_path, use_nginx=False)
    config = str(bench.config_file("validation"))

    def routes(with_rules: bool) -> dict:
        state = load_state([config], str(bench.validation_policies(with_rules=with_rules)))
        return {r.path: r for r in state.policies.plugins["insights"].routes}

    plain, ruled = routes(False), routes(True)
    assert set(plain) == set(ruled) == {"/health", "/services/{id}", "/services/{id}/notes"}
    assert not plain["/services/{id}"].query.rules and plain["/services/{id}/notes"].body is None
    assert {q.name for q in ruled["/services/{id}"].query.rules} == {"window", "limit", "tag"}
    assert ruled["/services/{id}/notes"].body is not None
    assert QUERY_TARGET.endswith("?window=30d&limit=20&tag=slo&tag=docs")
    assert json.loads(NOTE_BODY)["severity"] == "medium"
