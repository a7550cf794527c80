"""What the gateway records on each flow it handles: ``flow.metadata["stagedoor"]``.

One typed record per flow instead of a dict whose key presence carries meaning. The access
log, metrics and ``inspect`` read it; it is set when the request head is in and filled as the
flow goes on. Its saved form (what ``--save`` files and mitmweb's flow dumps hold) is the
plain dict of :meth:`FlowRecord.saved_form`: mitmproxy deep-copies ``flow.metadata`` whenever
it takes a flow's state, and that copy must be plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stagedoor.decide import Decision, Deny, Forward
from stagedoor.runtime import State

META = "stagedoor"


@dataclass(slots=True, eq=False)
class FlowRecord:
    request_id: str
    target: str  # the request target as the client sent it (forwarding rewrites the path)
    started: float  # perf_counter() when the request was in
    state: State  # captured once: everything about this flow is done with this state
    #: The values of the request's Authorization fields as the head came in: what was decided
    #: on (never saved with the flow, never shown).
    authorization: tuple[str, ...] = field(default=(), repr=False)
    decision: Decision | None = None
    #: "allow", "deny" or "error" (an error after or instead of the decision).
    outcome: str | None = None
    check: str | None = None  # the step that decided; "upstream" / "internal" for errors
    forwarded_at: float | None = None  # perf_counter() when it left for the upstream
    client_close: bool = False  # the client said "Connection: close"
    timed_out: bool = False  # the route timeout fired
    not_json: bool = False  # expect: json, and the upstream's answer was not (a 502)
    upstream_status: int | None = None
    status: int | None = None  # the status of an error page written without a response
    dropped_fields: int = 0  # header fields dropped at the head (names with underscores)
    body_timed_out: bool = False  # the body did not come in stagedoor.limits.bodyTimeoutSeconds
    crashed: bool = False  # the connection's handling crashed (addons/edge.py)
    #: (limiter, LimitOutcome) when a rate limit looked at it (addons/ratelimit.py)
    ratelimit: tuple[Any, Any] | None = None
    ratelimit_settled: bool = False
    #: The upstream response whose head the gateway already finished (responseheaders), so the
    #: response hook does not redo it.
    finished_head: object | None = None
    #: Why it failed after or instead of the decision (upstream refused, timed out, a bug).
    error_reason: str = ""

    def decided(self, decision: Decision) -> None:
        self.decision = decision
        self.outcome = "allow" if decision.allowed else "deny"
        self.check = decision.check

    def failed(self, check: str, status: int | None = None, reason: str = "") -> None:
        self.outcome = "error"
        self.check = check
        self.error_reason = reason
        if status is not None:
            self.status = status

    # -- read by the access log, metrics, inspect ---------------------------------------------
    @property
    def forwarded(self) -> bool:
        return isinstance(self.decision, Forward) and self.forwarded_at is not None

    @property
    def upstream(self) -> str | None:
        return self.decision.upstream.url if self.forwarded else None  # type: ignore[union-attr]

    @property
    def plugin(self) -> str | None:
        return self.decision.plugin_id if self.decision is not None else None

    @property
    def route(self) -> str | None:
        return self.decision.route_path if self.decision is not None else None

    @property
    def principal(self) -> str | None:
        d = self.decision
        return d.principal.subject if d is not None and d.principal is not None else None

    @property
    def principal_type(self) -> str | None:
        d = self.decision
        return d.principal.kind if d is not None and d.principal is not None else None

    @property
    def reason(self) -> str:
        """Why it was not allowed (log-only detail, never a secret): a denial's reason, else
        its client-facing message; an error's cause. Empty for an allowed, answered flow."""
        if self.error_reason:
            return self.error_reason
        if self.outcome == "error":
            return f"{self.check} error"
        if isinstance(self.decision, Deny):
            return self.decision.reason or self.decision.error.message
        return ""

    @property
    def url(self) -> str:
        """``request.url`` of error bodies: relative to the plugin mount, raw."""
        return self.decision.url if self.decision is not None else self.target

    def saved_form(self) -> dict[str, Any]:
        """Plain data: what a saved flow holds (None values left out)."""
        form: dict[str, Any] = {
            "request_id": self.request_id, "target": self.target, "started": self.started,
            "plugin": self.plugin, "route": self.route, "decision": self.outcome,
            "check": self.check, "principal": self.principal,
            "principal_type": self.principal_type, "reason": self.reason or None,
            "url": self.url, "upstream": self.upstream, "upstream_status": self.upstream_status,
            "forwarded_at": self.forwarded_at, "status": self.status,
            "dry_run": list(self.decision.dry_run) if self.decision and self.decision.dry_run
            else None,
            "timed_out": self.timed_out or None, "client_close": self.client_close or None,
        }
        return {key: value for key, value in form.items() if value is not None}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        # mitmproxy's Flow.get_state() deep-copies the metadata: give it the saved form.
        return self.saved_form()


def record_of(metadata: dict[str, Any]) -> FlowRecord | None:
    """The gateway's record of a flow, or None (a flow the gateway never saw, or a stored
    copy whose metadata holds the saved form)."""
    record = metadata.get(META)
    return record if isinstance(record, FlowRecord) else None
