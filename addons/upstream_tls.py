"""Per-upstream TLS: how stagedoor verifies an https upstream, and which client certificate it
shows, per connection instead of mitmproxy's global options.

mitmproxy's ``tlsconfig`` addon builds the upstream TLS connection from global options
(``ssl_verify_upstream_trusted_ca``, ``client_certs``, ``ssl_insecure``); a policy sets these per
upstream (``upstream.tls``). :class:`UpstreamTlsConfig` lets mitmproxy build the connection
as usual (SNI, ALPN, hostname verification, ciphers) and then swaps in this upstream's context:
its trusted CAs (or the system's), its client certificate, and no verification only when
the policy says ``insecureSkipVerify``. Contexts are built once per setting and reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from mitmproxy.addons import tlsconfig
from OpenSSL import SSL

from stagedoor.policy import UpstreamTls

log = logging.getLogger("stagedoor.tls")

Lookup = Callable[[tuple[str, int]], UpstreamTls | None]


@lru_cache(maxsize=64)
def client_context(setting: UpstreamTls) -> SSL.Context:
    """The pyOpenSSL context for one upstream's TLS setting (files were checked at load)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_NONE if setting.insecure_skip_verify else SSL.VERIFY_PEER,
                       None)
    if setting.ca_file:
        context.load_verify_locations(setting.ca_file)
    else:  # the system's trusted CAs (pyOpenSSL falls back to the usual bundle locations)
        context.set_default_verify_paths()
    if setting.cert_file:
        context.use_certificate_chain_file(setting.cert_file)
        context.use_privatekey_file(setting.key_file or setting.cert_file)
        context.check_privatekey()
    return context


def apply(connection: SSL.Connection, setting: UpstreamTls) -> None:
    """Give a not yet connected upstream TLS connection this upstream's context: its store of
    trusted CAs and its client certificate replace the global ones (the hostname check that
    mitmproxy set on the connection stays)."""
    connection.set_context(client_context(setting))
    if setting.insecure_skip_verify:
        connection.set_verify(SSL.VERIFY_NONE, None)


class UpstreamTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS configuration with two changes: per-upstream TLS from the policies
    (``lookup(address)``), and no ``request`` hook (mitmproxy's answers any path ending in
    ``/mitmproxy-<CA serial>.crl`` itself, before and regardless of the policy)."""

    name = "tlsconfig"

    def __init__(self, lookup: Lookup | None = None) -> None:
        super().__init__()
        self.lookup = lookup

    #: No ``request`` hook at all (not a handler that returns at once): mitmproxy's hook
    #: dispatch skips a hook attribute that is None, so no call is made per request.
    request = None

    def tls_start_server(self, tls_start: Any) -> None:
        super().tls_start_server(tls_start)
        if self.lookup is None or tls_start.ssl_conn is None:
            return
        address = tls_start.conn.address
        setting = self.lookup((address[0], address[1])) if address else None
        if setting is not None:
            apply(tls_start.ssl_conn, setting)
