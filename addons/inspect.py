"""``stagedoor inspect``: the sidecar under mitmweb, every flow annotated with its decision, and
no secret in anything the UI shows or a saved file stores.

How the secrets stay out
------------------------
mitmweb serves everything from one place, the master's View: the flow list, the update it
pushes to the browser at every hook (``flow_to_json``), ``/flows/dump``, bodies and content
views, and every command that takes flows (``export``, ``cut``, ``replay.client``...) resolves
them through it. :class:`ShadowView` takes that View's place and never holds a live flow:
whatever enters it (``add``) or is refreshed in it (``update``, which mitmproxy triggers after
every hook of a flow) is stored as a *scrubbed copy* with the same id. The live flow keeps its
headers and query and goes upstream untouched, so whatever the policy forwards still arrives.

What is scrubbed (:class:`Redactor`): the values of ``Authorization``, ``Proxy-Authorization``,
``Cookie``, ``Set-Cookie`` and ``stagedoor.inspect.redactHeaders`` (scheme and cookie names
stay visible), the values of query keys in ``stagedoor.accessLog.redactQueryKeys`` plus the
defaults, and each of those secret values (8 characters or longer) wherever else it appears in
the flow: bodies, metadata, comments, error messages. Bodies are not parsed otherwise, so a
secret an upstream invents in its response body is not found.

``--save`` writes the same scrubbed copies (:class:`RedactedSave`). mitmproxy's own writers of
live flows (``save_stream_file``, ``hardump``) are unloaded and their options refused, and so is
interception, whose "resume" would act on a copy: for live traffic the UI is read-only.

:func:`install` is the only code that touches mitmweb's private wiring (``WebMaster.view`` and
its ``_sig_view_*`` handlers, and which addons write flows); ``tests/test_inspect.py`` has the
tripwires that fail when an upgrade moves any of it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote_plus

from mitmproxy import ctx, exceptions, flow, http, io
from mitmproxy.addons import view

from stagedoor.config import Config, ConfigError
from stagedoor.runtime import GatewaySettings

from .record import META, FlowRecord, record_of

log = logging.getLogger("stagedoor.inspect")

PLACEHOLDER = "[REDACTED]"
DEFAULT_REDACTED_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
DEFAULT_MAX_FLOWS = 1000
# A secret this long or longer is also scrubbed wherever else it appears in a flow. Shorter
# values are redacted where they stand (header, query pair) but not searched for elsewhere:
# "1" or "abc" would wreck every body.
MIN_SCRUB_LENGTH = 8

MARK_DENIED = ":no_entry:"
MARK_ERROR = ":warning:"

# The flow list shows the decision (the comment) next to method, path and status.
WEB_COLUMNS = ["icon", "method", "path", "status", "comment", "size", "time"]

_PH = PLACEHOLDER.encode()
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9_.+-]{0,31}")


# -- settings --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InspectSettings:
    redact_headers: frozenset[str]
    redact_query_keys: frozenset[str]
    max_flows: int = DEFAULT_MAX_FLOWS
    save_path: str | None = None

    @classmethod
    def from_config(cls, config: Config, gateway: GatewaySettings, *,
                    max_flows: int | None = None, save_path: str | None = None
                    ) -> InspectSettings:
        """``stagedoor.inspect.*`` plus the gateway's redacted query keys; CLI values win."""
        configured = config.get_list("stagedoor.inspect.redactHeaders")
        headers = {str(h).strip().lower() for h in configured}
        if max_flows is None:
            number = config.get_number("stagedoor.inspect.maxFlows", DEFAULT_MAX_FLOWS)
            if number != int(number):
                raise ConfigError("Invalid value in config for key 'stagedoor.inspect.maxFlows': "
                                  f"use a whole number of flows, got {number}")
            max_flows = int(number)
        if max_flows < 1:
            raise ConfigError(f"The inspect flow buffer must hold at least 1 flow, got {max_flows} "
                              "(--max-flows / stagedoor.inspect.maxFlows)")
        return cls(
            redact_headers=frozenset(DEFAULT_REDACTED_HEADERS) | frozenset(h for h in headers if h),
            redact_query_keys=gateway.redacted_query_keys,
            max_flows=max_flows,
            save_path=save_path,
        )


# -- redaction -------------------------------------------------------------------------------------
class Redactor:
    """Turns a flow into the state of its scrubbed copy: what the UI and ``--save`` get.

    Secrets found in a flow are remembered by flow id, so a value seen at ``requestheaders``
    (the caller's token, stripped by the gateway before forwarding) is still scrubbed from
    whatever the later hooks add.
    """

    def __init__(self, headers: Iterable[str], query_keys: Iterable[str],
                 memory: int = 4 * DEFAULT_MAX_FLOWS) -> None:
        self.headers = frozenset(h.lower() for h in headers) | frozenset(DEFAULT_REDACTED_HEADERS)
        self.query_keys = frozenset(k.lower() for k in query_keys)
        self._seen: OrderedDict[str, dict[bytes, bytes]] = OrderedDict()
        self._memory = memory

    @classmethod
    def from_settings(cls, settings: InspectSettings) -> Redactor:
        return cls(settings.redact_headers, settings.redact_query_keys,
                   memory=max(4 * settings.max_flows, 1024))

    def scrubbed_state(self, f: flow.Flow) -> dict[str, Any]:
        """The state of ``f`` with every secret replaced; ``f`` itself is not changed."""
        state = f.get_state()
        state["backup"] = None  # the pre-edit copy would carry everything unredacted
        found: dict[bytes, bytes] = {}
        if state.get("type") == "http":  # stagedoor only makes HTTP flows; others: scrub only
            for part in ("request", "response"):
                message = state.get(part)
                if isinstance(message, dict):
                    message["headers"] = self._headers(message["headers"], found)
                    if message.get("trailers"):
                        message["trailers"] = self._headers(message["trailers"], found)
            request = state["request"]
            request["path"] = self._target(request["path"], found)
        # What the policy itself sends upstream from app-config (upstream.headers/query):
        # known values, scrubbed wherever they appear.
        record = record_of(f.metadata)
        route = record.decision.route if record is not None and record.decision else None
        if route is not None:
            for secret in route.secret_values:
                _found(found, secret.encode("utf-8", "surrogateescape"), _PH)
        meta = state.get("metadata", {}).get(META)
        _show_local_answer_at_the_sidecar(state, meta)
        if isinstance(meta, dict):  # the gateway's url/target/upstream carry the raw query
            for key, value in meta.items():
                if isinstance(value, str) and "?" in value:
                    meta[key] = self._target(value.encode("utf-8", "surrogateescape"),
                                             found).decode("utf-8", "surrogateescape")
        secrets = self._remember(str(state.get("id")), found)
        if not secrets:
            return state
        by_length = sorted(secrets.items(), key=lambda kv: len(kv[0]), reverse=True)
        text_pairs: list[tuple[str, str]] = []
        for secret, shown in by_length:
            for encoding in ("utf-8", "latin-1"):
                pair = (secret.decode(encoding, "surrogateescape" if encoding == "utf-8"
                                      else "strict"), shown.decode(encoding, "replace"))
                if pair not in text_pairs:
                    text_pairs.append(pair)
        return _scrub(state, by_length, text_pairs)

    def scrubbed_copy(self, f: flow.Flow) -> flow.Flow:
        return flow.Flow.from_state(self.scrubbed_state(f))

    def forget(self, flow_id: str) -> None:
        self._seen.pop(flow_id, None)

    def retain(self, flow_ids: Iterable[str]) -> None:
        keep = set(flow_ids)
        for flow_id in [i for i in self._seen if i not in keep]:
            del self._seen[flow_id]

    # -- internals ---------------------------------------------------------------------------
    def _remember(self, flow_id: str, found: dict[bytes, bytes]) -> dict[bytes, bytes]:
        secrets = self._seen.get(flow_id)
        if secrets is None:
            if not found:
                return {}
            secrets = self._seen[flow_id] = {}
        else:
            self._seen.move_to_end(flow_id)
        secrets.update(found)
        while len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return secrets

    def _headers(self, fields: Sequence[tuple[bytes, bytes]], found: dict[bytes, bytes]
                 ) -> tuple[tuple[bytes, bytes], ...]:
        out = []
        for name, value in fields:
            lower = name.decode("latin-1").lower()
            if lower in self.headers and value:
                value = _redact_header(lower, value, found)
            out.append((name, value))
        return tuple(out)

    def _target(self, target: bytes, found: dict[bytes, bytes]) -> bytes:
        path, sep, query = target.partition(b"?")
        if not sep or not self.query_keys:
            return target
        parts = []
        for pair in query.split(b"&"):
            name, eq, value = pair.partition(b"=")
            key = unquote_plus(name.decode("latin-1")).lower()
            if eq and value and key in self.query_keys and value != _PH:
                shown = name + b"=" + _PH
                _found(found, pair, shown, min_length=1)  # the whole pair is specific enough
                _found(found, value, _PH)
                decoded = unquote_plus(value.decode("latin-1")).encode("latin-1", "replace")
                if decoded != value:
                    _found(found, decoded, _PH)
                parts.append(shown)
            else:
                parts.append(pair)
        return path + b"?" + b"&".join(parts)


def _show_local_answer_at_the_sidecar(state: dict[str, Any], meta: Any) -> None:
    """A request stagedoor answered itself (a refusal, a health check) still has mitmproxy's
    reverse-mode placeholder as its destination (``127.0.0.1:9``, never contacted); show the
    address the client called instead. Forwarded requests keep their upstream."""
    request, client = state.get("request"), state.get("client_conn") or {}
    sockname = client.get("sockname")
    if (isinstance(meta, dict) and "upstream" not in meta and isinstance(request, dict)
            and sockname and len(sockname) >= 2 and sockname[1]):
        request["host"], request["port"] = str(sockname[0]), int(sockname[1])


def _found(found: dict[bytes, bytes], secret: bytes, shown: bytes,
           min_length: int = MIN_SCRUB_LENGTH) -> None:
    secret = secret.strip()
    if len(secret) >= min_length and _PH not in secret and secret not in _PH:
        found[secret] = shown


def _redact_header(name: str, value: bytes, found: dict[bytes, bytes]) -> bytes:
    """The value as the UI shows it: credentials and cookie values replaced, the rest kept."""
    if name == "cookie":
        shown_parts = []
        for part in value.split(b";"):
            cname, eq, cvalue = part.strip().partition(b"=")
            if eq:
                shown_parts.append(cname + b"=" + _PH)
                _found(found, cvalue, _PH)
            elif part.strip():
                shown_parts.append(_PH)
                _found(found, part, _PH)
        shown = b"; ".join(shown_parts)
    elif name == "set-cookie":
        first, sep, attributes = value.partition(b";")
        cname, eq, cvalue = first.partition(b"=")
        shown = (cname + b"=" + _PH if eq else _PH) + sep + attributes
        _found(found, cvalue if eq else first, _PH)
    elif name in ("authorization", "proxy-authorization"):
        scheme, space, credentials = value.strip().partition(b" ")
        if space and _SCHEME.fullmatch(scheme):
            shown = scheme + b" " + _PH
            _found(found, credentials, _PH)
        else:
            shown = _PH
    else:
        shown = _PH
    _found(found, value, shown)
    return shown


def _scrub(value: Any, byte_pairs: list[tuple[bytes, bytes]],
           text_pairs: list[tuple[str, str]]) -> Any:
    """``value`` with every secret replaced, walking dicts, lists and tuples."""
    if isinstance(value, bytes):
        for secret, shown in byte_pairs:
            if secret in value:
                value = value.replace(secret, shown)
        return value
    if isinstance(value, str):
        for text, shown_text in text_pairs:
            if text in value:
                value = value.replace(text, shown_text)
        return value
    if isinstance(value, dict):
        return {(_scrub(k, byte_pairs, text_pairs) if isinstance(k, str) else k):
                _scrub(v, byte_pairs, text_pairs) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, byte_pairs, text_pairs) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, byte_pairs, text_pairs) for v in value)
    return value


# -- the UI's store --------------------------------------------------------------------------------
class ShadowView(view.View):
    """mitmweb's View, holding scrubbed copies only, and at most ``max_flows`` of them.

    ``add`` and ``update`` are the View's only ways in: the hooks call them with live flows,
    the UI's handlers with the copies they got from here. A live flow is copied (``add``) or
    its copy refreshed in place (``update``). A copy that comes back changed (edited in the UI,
    or replayed: mitmproxy replays the very object, through the gateway, and stores the
    upstream's answer in it) is scrubbed again, in place. When the store is full the oldest
    flow is dropped, live or not (a dropped live flow is not re-added).
    """

    name = "view"  # the addon name of the View it replaces

    def __init__(self, redactor: Redactor, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        super().__init__()
        self.redactor = redactor
        self.max_flows = max_flows
        self.sig_store_remove.connect(self._forget)
        self.sig_store_refresh.connect(self._retain)

    def add(self, flows: Sequence[flow.Flow]) -> None:
        copies = [self.redactor.scrubbed_copy(f) for f in flows if f.id not in self._store]
        super().add(copies)
        while len(self._store) > self.max_flows:
            oldest = next(iter(self._store.values()))
            self.remove([oldest])

    def update(self, flows: Sequence[flow.Flow]) -> None:
        shown = []
        for f in flows:
            copy = self._store.get(f.id)
            if copy is None:
                continue
            if copy is not f:
                copy.set_state(self.redactor.scrubbed_state(f))
            else:
                _scrub_in_place(copy, self.redactor.scrubbed_state(copy))
            shown.append(copy)
        if shown:
            super().update(shown)

    def _forget(self, flow: flow.Flow) -> None:
        self.redactor.forget(flow.id)

    def _retain(self) -> None:
        self.redactor.retain(self._store)


def _scrub_in_place(f: flow.Flow, state: dict[str, Any]) -> None:
    """Apply a scrubbed state to a flow that may be in flight (a replay): messages, metadata,
    comment and error are updated in place, the connection objects are left alone."""
    if isinstance(f, http.HTTPFlow):
        f.request.set_state(state["request"])
        if f.response is not None and state.get("response"):
            f.response.set_state(state["response"])
    # The gateway's live record of a flow in flight is kept: it drives the hooks still to come,
    # and what it holds came from the already scrubbed request (its saved form is scrubbed
    # again at every take of the state).
    live = f.metadata.get(META)
    f.metadata.clear()
    f.metadata.update(state["metadata"])
    if isinstance(live, FlowRecord):
        f.metadata[META] = live
    f.comment = state["comment"]
    if f.error is not None and state.get("error"):
        f.error.msg = state["error"]["msg"]


# -- annotations -----------------------------------------------------------------------------------
def describe(f: http.HTTPFlow) -> str | None:
    """The one-line decision shown as the flow's comment, or None for a flow stagedoor did not
    handle. Starts with the decision; ``key=value`` pairs so filters can be exact."""
    meta = f.metadata.get(META)
    if isinstance(meta, FlowRecord):
        meta = meta.saved_form()
    if not isinstance(meta, dict):
        return None
    decision = meta.get("decision") or "unknown"
    parts = [decision]
    if decision != "allow" and meta.get("check"):
        parts.append(f"check={meta['check']}")
    parts.append(f"plugin={meta.get('plugin') or '-'}")
    parts.append(f"route={meta.get('route') or '-'}")
    parts.append(f"principal={meta.get('principal') or '-'}")
    if meta.get("principal_type"):
        parts.append(f"type={meta['principal_type']}")
    why = _why(f, meta, decision)
    return " ".join(parts) + (f" — {why}" if why else "")


def _why(f: http.HTTPFlow, meta: dict[str, Any], decision: str) -> str:
    if decision == "error" and meta.get("check") == "upstream":
        return "upstream timed out" if meta.get("timed_out") else "upstream unreachable"
    if decision != "deny":
        return ""
    message = ""
    if f.response is not None:
        try:
            message = str(json.loads(f.response.content or b"{}")["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = ""
    reason = str(meta.get("reason") or "")
    if reason and message and reason != message:
        return f"{message} ({reason})"
    return message or reason


class Annotator:
    """Writes the decision on every flow: the comment, and a mark on denials and errors."""

    def _annotate(self, f: http.HTTPFlow) -> None:
        text = describe(f)
        if text is None:
            return
        f.comment = text
        decision = text.partition(" ")[0]  # describe() starts with the decision
        if decision == "deny":
            f.marked = MARK_DENIED
        elif decision == "error":
            f.marked = MARK_ERROR

    def requestheaders(self, f: http.HTTPFlow) -> None:
        # The gateway decides on the head: a refusal's response is set in this hook already,
        # so the UI must not show it without its decision.
        self._annotate(f)

    def request(self, f: http.HTTPFlow) -> None:
        self._annotate(f)

    def response(self, f: http.HTTPFlow) -> None:
        self._annotate(f)

    def error(self, f: http.HTTPFlow) -> None:
        self._annotate(f)


# -- saving ----------------------------------------------------------------------------------------
class RedactedSave:
    """``--save FILE``: every finished flow, scrubbed, in mitmproxy's flow file format."""

    def __init__(self, path: str, redactor: Redactor) -> None:
        self.path = path
        self.redactor = redactor
        self._file: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed in done()
        self._writer = io.FlowWriter(self._file)
        self.count = 0

    def _write(self, f: flow.Flow) -> None:
        if self._file is None:
            return
        self._writer.add(self.redactor.scrubbed_copy(f))
        self._file.flush()
        self.count += 1

    def response(self, f: http.HTTPFlow) -> None:
        self._write(f)

    def error(self, f: http.HTTPFlow) -> None:
        if f.response is None:  # with a response, it was written at the response hook
            self._write(f)

    def done(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            log.info("saved %d redacted flow(s) to %s", self.count, self.path)


# -- guard -----------------------------------------------------------------------------------------
REFUSED_OPTIONS = {
    "save_stream_file": "save_stream_file would store unredacted flows; use "
                        "`stagedoor inspect --save FILE`, which writes redacted ones",
    "hardump": "hardump would store unredacted flows; use `stagedoor inspect --save FILE`",
    "intercept": "interception is off: the UI holds redacted copies, so it is read-only for "
                 "live traffic",
}


class InspectGuard:
    """Refuses options that would write live (unredacted) flows or pause traffic the UI
    cannot resume. A refused update is rolled back by mitmproxy and reported to the UI."""

    def configure(self, updated: set[str]) -> None:
        for name, why in REFUSED_OPTIONS.items():
            if name in updated and getattr(ctx.options, name, None):
                raise exceptions.OptionsError(f"stagedoor inspect: {why}")


# -- the web server's own log ----------------------------------------------------------------------
class _TokenFilter(logging.Filter):
    """tornado logs each UI request with its query, and the browser's first one carries the
    login token: keep it out of the console (it is printed once, at start)."""

    _TOKEN = re.compile(r"([?&]token=)[^&\s)]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._TOKEN.sub(r"\1" + PLACEHOLDER, a) if isinstance(a, str)
                                else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._TOKEN.sub(r"\1" + PLACEHOLDER, record.msg)
        return True


def quiet_web_access_log() -> None:
    """UI requests are logged only when refused or failing, never with the token (idempotent)."""
    access = logging.getLogger("tornado.access")
    access.setLevel(logging.WARNING)
    if not any(isinstance(f, _TokenFilter) for f in access.filters):
        access.addFilter(_TokenFilter())


# -- wiring (the only place that knows mitmweb's private structure) --------------------------------
# Addons of mitmweb's master that write live flows to disk; their options are refused above.
LIVE_FLOW_WRITERS = ("save", "savehar")


def install(master: Any, settings: InspectSettings) -> ShadowView:
    """Add annotations, redacted saving and the guard to a ``WebMaster`` (after the gateway),
    and put a :class:`ShadowView` in place of its View. Returns the new View."""
    redactor = Redactor.from_settings(settings)
    quiet_web_access_log()
    for name in LIVE_FLOW_WRITERS:
        writer = master.addons.get(name)
        if writer is None:  # pragma: no cover - tripwire in tests/test_inspect.py
            raise RuntimeError(f"mitmweb internals changed: no addon {name!r}; "
                               "see addons/inspect.py")
        master.addons.remove(writer)
    master.addons.add(Annotator(), InspectGuard())
    if settings.save_path:
        master.addons.add(RedactedSave(settings.save_path, redactor))

    shadow = ShadowView(redactor, settings.max_flows)
    old = master.view
    master.addons.remove(old)
    shadow.sig_view_add.connect(master._sig_view_add)
    shadow.sig_view_update.connect(master._sig_view_update)
    shadow.sig_view_remove.connect(master._sig_view_remove)
    shadow.sig_view_refresh.connect(master._sig_view_refresh)
    master.view = shadow
    master.addons.add(shadow)
    return shadow
