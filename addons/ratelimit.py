"""Rate limits on a flow: the gateway calls these at three points of a request.

1. :func:`limit_head`, before anything is decided: Backstage's limiters (``backend.rateLimit``,
   global then the plugin's), keyed by client IP, as a Backstage backend runs them before its
   routers.
2. :func:`limit_decided`, once the request is authenticated and routed: the policy's
   ``rateLimit:`` rules (the route's, else the plugin's), keyed by the verified principal.
3. :func:`finish_headers` and :func:`settle` on the way out: the X-RateLimit-* / RateLimit
   headers onto whatever answer leaves, and the hits ``skipSuccessfulRequests`` /
   ``skipFailedRequests`` give back once the status is known.

A refusal is answered here (Backstage's own body for its keys) and returned as a
:class:`~stagedoor.decide.Deny` with check ``ratelimit`` for the record. Everything reads the
state the flow captured: its settings and its limiter (the store chosen at load).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from mitmproxy import http

from stagedoor.decide import API_PREFIX, Context, Decision, Deny
from stagedoor.errors import utf8_safe
from stagedoor.logsetup import redact_target
from stagedoor.ratelimit import LimitOutcome, RateLimitRule, client_ip, render_refusal

from .record import FlowRecord

log = logging.getLogger("stagedoor.ratelimit")

#: The steps a routed request reaches; a request refused earlier (401, 404, 405, 403 for the
#: principal kind) is not counted by the policy's rules.
_CHECKED_AFTER = frozenset({"allow", "params", "permission"})
_TASKS: set[asyncio.Task[None]] = set()


def _peer(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else ""


def _client_ip(flow: http.HTTPFlow, record: FlowRecord) -> str:
    return client_ip(_peer(flow), flow.request.headers.get_all("x-forwarded-for"),
                     record.state.ratelimit.trusted_proxies)


def _refuse(flow: http.HTTPFlow, record: FlowRecord, outcome: LimitOutcome,
            context: Context) -> Deny:
    assert outcome.error is not None
    url = utf8_safe(redact_target(context.url, record.state.settings.redacted_query_keys))
    status, body, headers = render_refusal(outcome, utf8_safe(flow.request.method), url)
    flow.response = http.Response.make(status, body, [
        (k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers])
    return Deny(context, outcome.error, "ratelimit", "; ".join(outcome.notes[-1:]))


async def limit_head(flow: http.HTTPFlow, record: FlowRecord, url: str) -> Deny | None:
    """Backstage's limiters; a Deny (already answered) when the request is refused."""
    settings = record.state.ratelimit
    path = flow.request.path
    plugin: str | None = None
    if path.startswith(API_PREFIX):
        candidate = path[len(API_PREFIX):].partition("/")[0].partition("?")[0]
        plugin = candidate if candidate in record.state.policies.plugins else None
    limiter = record.state.limiter
    outcome = await limiter.check_head(settings, plugin, _client_ip(flow, record), _peer(flow))
    record.ratelimit = (limiter, outcome)
    if not outcome.refused:
        return None
    return _refuse(flow, record, outcome, Context(url, plugin))


def rules_for(record: FlowRecord, decision: Decision) -> tuple[RateLimitRule, ...]:
    """The policy's rules that count this request (none unless it was routed and got past
    the principal checks): the route's, else the plugin's. Cheap: no await when empty."""
    route = decision.route
    if route is None or decision.check not in _CHECKED_AFTER:
        return ()
    policy = record.state.policies.plugins.get(decision.plugin_id or "")
    return policy.rate_limits_for(route) if policy is not None else ()


async def limit_decided(flow: http.HTTPFlow, record: FlowRecord, decision: Decision,
                        rules: tuple[RateLimitRule, ...]) -> Decision:
    """The policy's ``rules`` (:func:`rules_for`) for a routed request: the decision as it
    stands (dry-run notes added), or a Deny (already answered) when a rule refuses it."""
    outcome = record.ratelimit[1] if record.ratelimit is not None else LimitOutcome()
    headers: dict[str, str] = {}
    for rule in rules:
        name = rule.header_name
        if name is not None and name not in headers:
            values = flow.request.headers.get_all(name)
            if values:
                headers[name] = values[0]
    principal = decision.principal.subject if decision.principal is not None else None
    limiter = record.state.limiter
    await limiter.check_policy(record.state.ratelimit, rules, principal,
                               _client_ip(flow, record), headers, outcome)
    record.ratelimit = (limiter, outcome)
    context = decision.context
    if outcome.dry_run:  # logged and counted with the decision's other dry-run notes
        context = dataclasses.replace(context, dry_run=context.dry_run + tuple(outcome.dry_run))
        decision = dataclasses.replace(decision, context=context)
    if outcome.refused:
        return _refuse(flow, record, outcome, context)
    return decision


def finish_headers(record: FlowRecord | None, fields: tuple[tuple[bytes, bytes], ...],
                   ) -> tuple[tuple[bytes, bytes], ...]:
    """The answer's header fields with the limits' headers set (replacing same-named ones)."""
    if record is None or record.ratelimit is None or not record.ratelimit[1].headers:
        return fields
    ours = [(name.encode("latin-1"), value.encode("latin-1"))
            for name, value in record.ratelimit[1].headers]
    names = {name.lower() for name, _ in ours}
    return tuple(f for f in fields if f[0].lower() not in names) + tuple(ours)


def settle(record: FlowRecord | None, status: int | None) -> None:
    """Give back the hits ``skip*Requests`` do not count, in the background (once)."""
    if record is None or record.ratelimit is None or record.ratelimit_settled:
        return
    record.ratelimit_settled = True
    limiter, outcome = record.ratelimit
    if not outcome.decrements:
        return
    task = asyncio.get_running_loop().create_task(limiter.settle(outcome.decrements, status))
    _TASKS.add(task)  # a reference until it is done
    task.add_done_callback(_TASKS.discard)
