"""The forwarding header policy in process (stagedoor/forwarding.py): hostile header tables
over raw fields, no proxy. tests/test_hardening_paths.py keeps an end-to-end smoke set."""

from __future__ import annotations

import itertools

import pytest

from stagedoor import forwarding as fw
from stagedoor.auth import Principal
from stagedoor.errors import SECURITY_HEADERS
from stagedoor.identity import Caller, Mutator, PlainHeaders

from .hardening import SPOOFED_HEADERS

JANE = Principal("user", "user:default/jane")
POLICY = fw.ForwardingPolicy.from_settings(SECURITY_HEADERS)
PLAIN = PlainHeaders()
CLIENT = fw.Client("127.0.0.1", tls=False)


def enc(pairs: list[tuple[str, str]]) -> fw.Fields:
    return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs)


def caller(principal: Principal | None = JANE, request_id: str = "rid-1") -> Caller:
    return Caller(principal, "t0k3n-secret" if principal else None, request_id, "insights")


def up(pairs: list[tuple[str, str]], principal: Principal | None = JANE,
       policy: fw.ForwardingPolicy = POLICY, identity: Mutator = PLAIN,
       **kw: object) -> fw.UpstreamHead:
    base = [("Host", "sidecar.test:7007"), ("Authorization", "Bearer t0k3n-secret")]
    return fw.upstream_fields(enc(base + pairs), identity=identity, caller=caller(principal),
                              host="up.test:8080", client=CLIENT, policy=policy,
                              **kw)  # type: ignore[arg-type]


def values(fields: fw.Fields, name: str) -> list[bytes]:
    return [v for k, v in fields if k.lower() == name.lower().encode()]


# -- hostile request headers ---------------------------------------------------------------------
# Each spoofed header in every case variant a client might try.
CASED = [(variant, value) for name, value in SPOOFED_HEADERS  # (ordered: xdist workers agree)
         for variant in dict.fromkeys([name, name.lower(), name.upper(), name.title()])]


@pytest.mark.parametrize(("name", "value"), CASED, ids=[f"{n}" for n, _ in CASED])
def test_a_spoofed_header_never_goes_upstream_as_sent(name, value):
    head = up([(name, value)])
    assert (name.encode(), value.encode()) not in head.fields


def test_the_whole_spoof_table_at_once_leaves_only_what_the_sidecar_sets():
    head = up(SPOOFED_HEADERS)
    names = [k.decode().lower() for k, _ in head.fields]
    assert names == ["host", "x-stagedoor-principal", "x-stagedoor-principal-type",
                     "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"]
    assert values(head.fields, "x-stagedoor-principal") == [b"user:default/jane"]
    assert values(head.fields, "x-stagedoor-principal-type") == [b"user"]
    assert values(head.fields, "x-forwarded-for") == [b"127.0.0.1"]
    assert values(head.fields, "x-forwarded-proto") == [b"http"]
    assert values(head.fields, "x-forwarded-host") == [b"sidecar.test:7007"]
    assert values(head.fields, "host") == [b"up.test:8080"]


def test_authorization_never_goes_upstream():
    assert values(up([]).fields, "authorization") == []


@pytest.mark.parametrize("listed", ["X-Secret", "x-secret, keep-alive", "close, X-Secret",
                                    " X-SECRET ,foo"])
def test_headers_listed_in_connection_are_hop_by_hop(listed):
    head = up([("Connection", listed), ("X-Secret", "1"), ("X-Kept", "1")])
    assert values(head.fields, "x-secret") == [] and values(head.fields, "connection") == []
    assert values(head.fields, "x-kept") == [b"1"]
    assert head.client_close is ("close" in listed)


@pytest.mark.parametrize("framing", ["Content-Length", "Transfer-Encoding"])
def test_framing_headers_stay_even_when_listed_in_connection(framing):
    head = up([("Connection", framing), (framing, "5")])
    assert values(head.fields, framing) == [b"5"]


def test_no_principal_sets_no_identity_and_still_strips_a_spoofed_one():
    head = up([("X-Stagedoor-Principal", "user:default/admin")], principal=None)
    assert values(head.fields, "x-stagedoor-principal") == []


def test_configured_identity_names_are_stripped_and_set():
    identity = PlainHeaders("X-User", "X-User-Kind")
    head = up([("x-user", "admin"), ("X-USER-KIND", "service")], identity=identity)
    assert values(head.fields, "x-user") == [b"user:default/jane"]
    assert values(head.fields, "x-user-kind") == [b"user"]


def test_several_hosts_are_joined_in_x_forwarded_host_and_host_is_the_upstreams():
    head = fw.upstream_fields(enc([("Host", "a"), ("Host", "b")]), identity=PLAIN,
                              caller=caller(None), host="up", client=CLIENT, policy=POLICY)
    assert values(head.fields, "x-forwarded-host") == [b"a, b"]
    assert values(head.fields, "host") == [b"up"]


def test_request_id_replaces_the_clients_copies():
    head = up([("X-Request-Id", "a"), ("x-request-id", "b")])
    assert values(head.fields, "x-request-id") == [b"rid-1"]


def test_tls_client_is_forwarded_as_https():
    head = fw.upstream_fields((), identity=PLAIN, caller=caller(None), host="up",
                              client=fw.Client("::1", tls=True), policy=POLICY)
    assert values(head.fields, "x-forwarded-proto") == [b"https"]
    assert values(head.fields, "x-forwarded-for") == [b"::1"]


def test_unrelated_headers_pass_in_order_and_byte_for_byte():
    pairs = [("Accept", "application/json"), ("X-Custom", "a\xe9b"), ("Accept", "text/plain")]
    head = up(pairs)
    assert [f for f in head.fields if f[0] in (b"Accept", b"X-Custom")] == list(enc(pairs))


# -- extension points ----------------------------------------------------------------------------
def test_route_headers_replace_the_clients_copies():
    head = up([("X-Api-Key", "client-guess")], extra=((b"X-Api-Key", b"route-secret"),))
    assert values(head.fields, "x-api-key") == [b"route-secret"]


def test_a_protected_name_normaliser_catches_underscore_variants():
    underscore = fw.ForwardingPolicy(security=POLICY.security,
                                     protected_name=lambda name: name.replace(b"_", b"-"))
    spoofs = [("X_Forwarded_For", "10.0.0.1"), ("x_stagedoor_principal", "admin"),
              ("X_HTTP_Method_Override", "DELETE")]
    assert all(values(up(spoofs).fields, n) for n, _ in spoofs)  # the default keeps them
    head = up(spoofs, policy=underscore)
    assert not any(values(head.fields, n) for n, _ in spoofs)


def test_an_identity_mutator_decides_what_identity_goes_upstream():
    class SignedIdentity:
        kind = "test"
        names = frozenset({b"x-identity-jwt"})

        def fields(self, caller: Caller) -> fw.Fields:
            principal = caller.principal
            return ((b"X-Identity-Jwt", b"signed:" + principal.subject.encode()),) \
                if principal else ()

        def describe(self) -> str:
            return "test"

    head = up([("X-Identity-Jwt", "forged")], identity=SignedIdentity())
    assert values(head.fields, "x-identity-jwt") == [b"signed:user:default/jane"]
    assert values(head.fields, "x-stagedoor-principal") == []


# -- back to the client --------------------------------------------------------------------------
def test_security_headers_are_added_where_missing_and_an_upstreams_own_value_stays():
    fields = fw.client_fields(enc([("X-Frame-Options", "DENY")]), policy=POLICY,
                              forwarded=True, request_id="rid-1")
    assert values(fields, "x-frame-options") == [b"DENY"]
    for name in SECURITY_HEADERS:
        assert values(fields, name), name
    assert values(fields, "x-request-id") == [b"rid-1"]


def test_an_upstreams_hop_by_hop_headers_are_dropped_and_close_is_echoed():
    upstream = enc([("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "t=5"),
                    ("Content-Length", "2"), ("X-Request-Id", "upstream-id")])
    fields = fw.client_fields(upstream, policy=POLICY, forwarded=True, request_id="rid",
                              client_close=True)
    assert values(fields, "x-hop") == [] and values(fields, "keep-alive") == []
    assert values(fields, "connection") == [b"close"]
    assert values(fields, "content-length") == [b"2"]
    assert values(fields, "x-request-id") == [b"rid"]


def test_client_fields_are_stable_when_applied_twice():
    """responseheaders and response both finish a streamed answer's head."""
    upstream = enc([("Connection", "X-Hop"), ("X-Hop", "1"), ("Content-Length", "2")])
    once = fw.client_fields(upstream, policy=POLICY, forwarded=True, request_id="r",
                            client_close=True)
    twice = fw.client_fields(once, policy=POLICY, forwarded=True, request_id="r",
                             client_close=True)
    assert sorted(once) == sorted(twice)


def test_a_local_answer_keeps_its_own_headers_and_gets_no_filter():
    def drop_all(fields: fw.Fields) -> fw.Fields:
        raise AssertionError("the response filter runs on upstream answers only")

    policy = fw.ForwardingPolicy(security=POLICY.security, response_filter=drop_all)
    fields = fw.client_fields(enc([("Connection", "close")]), policy=policy, forwarded=False,
                              request_id=None)
    assert values(fields, "connection") == [b"close"]
    assert values(fields, "x-request-id") == []


def test_the_response_filter_runs_before_the_security_headers():
    def no_server(fields: fw.Fields) -> fw.Fields:
        return tuple(f for f in fields if f[0].lower() not in (b"server", b"x-frame-options"))

    policy = fw.ForwardingPolicy(security=POLICY.security, response_filter=no_server)
    fields = fw.client_fields(enc([("Server", "nginx"), ("X-Frame-Options", "ALLOWALL")]),
                              policy=policy, forwarded=True, request_id="r")
    assert values(fields, "server") == []
    assert values(fields, "x-frame-options") == [b"SAMEORIGIN"]  # ours, not the upstream's


# -- request ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sent", [["abc-123"], ["a.b:c_d"], ["x" * 128]])
def test_a_well_formed_request_id_is_kept(sent):
    assert fw.request_id(sent) == sent[0]


@pytest.mark.parametrize("sent", [[], ["a", "b"], ["x" * 129], ["a b"], ["a\nb"], [""],
                                  ["<script>"], ["a/b"]])
def test_anything_else_gets_a_fresh_id(sent):
    new = fw.request_id(sent)
    assert len(new) == 32 and int(new, 16) >= 0 and new not in sent


def test_fresh_ids_do_not_repeat():
    ids = {fw.request_id([]) for _ in itertools.repeat(None, 1000)}
    assert len(ids) == 1000
