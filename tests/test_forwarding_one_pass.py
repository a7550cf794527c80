"""The one-pass header rewrites of stagedoor/forwarding.py give, field for field and in order,
what the plain step-by-step rules give (the reference implementations below, as they were
before issue 18 folded them into one pass), over generated header sets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stagedoor import forwarding as fw
from stagedoor.auth import Principal
from stagedoor.identity import Caller, PlainHeaders

NAMES = [b"Host", b"hOST", b"X-Request-Id", b"x-request-id", b"Connection", b"connection",
         b"Authorization", b"X-Forwarded-For", b"x_forwarded_for", b"X-Stagedoor-Principal",
         b"Content-Length", b"Transfer-Encoding", b"Keep-Alive", b"Accept", b"X-Api-Key",
         b"X-Secret", b"X-User", b"Forwarded", b"X-Real-Ip", b"Upgrade", b"Set-Cookie",
         b"Server", b"X-Frame-Options", b"x-content-type-options", b"Date"]
VALUES = [b"a", b"close", b"X-Secret, keep-alive", b"host", b"x-request-id", b"1",
          b"Bearer t", b"content-length", b"X-Api-Key"]
FIELDS = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=12)


def reference_upstream_fields(fields, *, identity, caller, host, client, policy, extra=()):
    listed = fw.connection_tokens(fields)
    protect = policy.protected_name
    made = identity.fields(caller)
    own = {name.lower() for name, _ in extra}
    kept, hosts = [], []
    for name, value in fields:
        lower = name.lower()
        if lower == b"host":
            hosts.append(value)
        if lower in fw._FRAMING_B:
            kept.append((name, value))
            continue
        checked = protect(lower)
        if (checked in fw._REQUEST_DROP_B or lower in listed or checked in identity.names
                or checked in own or checked.startswith(fw._REQUEST_DROP_PREFIXES_B)):
            continue
        kept.append((name, value))
    kept.extend(made)
    kept.extend(extra)
    kept.append((b"X-Forwarded-For", fw.encode(client.address)))
    kept.append((b"X-Forwarded-Proto", b"https" if client.tls else b"http"))
    if hosts:
        kept.append((b"X-Forwarded-Host", b", ".join(hosts)))
    out = fw.set_field(tuple(kept), b"X-Request-Id", fw.encode(caller.request_id))
    out = fw.set_field(out, b"Host", fw.encode(host))
    return fw.UpstreamHead(out, b"close" in listed)


def _underscore(lower: bytes) -> bytes:
    return lower.replace(b"_", b"-")


@settings(max_examples=400, deadline=None)
@given(fields=FIELDS, extra=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
                                     max_size=3),
       principal=st.booleans(), underscores=st.booleans(), identity_names=st.booleans())
def test_upstream_fields_in_one_pass_match_the_rules_step_by_step(fields, extra, principal,
                                                                  underscores, identity_names):
    policy = fw.ForwardingPolicy(protected_name=_underscore if underscores else fw.same_name)
    identity = PlainHeaders("X-User", "Host") if identity_names else PlainHeaders()
    caller = Caller(Principal("user", "user:default/jane") if principal else None, "t",
                    "rid-1", "insights")
    kw = dict(identity=identity, caller=caller, host="up.test:8080",
              client=fw.Client("127.0.0.1"), policy=policy, extra=tuple(extra))
    assert fw.upstream_fields(tuple(fields), **kw) == reference_upstream_fields(
        tuple(fields), **kw)


SECURITY = [{}, {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"},
            {"Server": "stagedoor"}, {"Connection": "odd"}, {"X-Request-Id": "odd"}]
DROPPED = st.frozensets(st.sampled_from([b"set-cookie", b"server", b"x-secret", b"x-request-id",
                                         b"content-length", b"date"]))


@settings(max_examples=400, deadline=None)
@given(fields=FIELDS, dropped=DROPPED, security=st.sampled_from(SECURITY),
       client_close=st.booleans())
def test_forwarded_fields_in_one_pass_match_filter_then_client_fields(fields, dropped, security,
                                                                      client_close):
    from stagedoor.response_rules import filter_response_fields

    policy = fw.ForwardingPolicy.from_settings(security)
    want = fw.client_fields(filter_response_fields(tuple(fields), dropped, policy.security),
                            policy=policy, forwarded=True, request_id="rid-1",
                            client_close=client_close)
    assert fw.forwarded_fields(tuple(fields), dropped, policy=policy, request_id="rid-1",
                               client_close=client_close) == want
