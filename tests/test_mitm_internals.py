"""Tripwires for the two mitmproxy internals stagedoor relies on (addons/mitm_internals.py).

If a mitmproxy upgrade moves them, these fail with a message that says where to look, before
any client sees an HTML error page or waits forever on a hung upstream.
"""

import inspect

from mitmproxy.proxy import server
from mitmproxy.proxy.layers.http import _http1

from addons import mitm_internals


def test_make_error_response_exists_with_the_expected_signature():
    fn = getattr(_http1, "make_error_response", None)
    assert callable(fn), "mitmproxy moved _http1.make_error_response"
    params = list(inspect.signature(fn).parameters)
    assert params[:2] == ["status_code", "message"]


def test_http1_server_looks_the_function_up_at_call_time():
    # The replacement only works if the layer calls the module global, not a bound copy.
    source = inspect.getsource(_http1.Http1Server)
    assert "make_error_response(" in source


def test_installing_replaces_the_writer_with_json():
    mitm_internals.install_error_pages()
    assert _http1.make_error_response is mitm_internals.json_error_response
    raw = _http1.make_error_response(502, "boom")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502")
    assert b"application/json" in head
    assert body.startswith(b'{"error":{"name":"BadGatewayError"')


def test_registered_error_is_used_for_the_same_message_object():
    message = "".join(["Connect call ", "failed"])  # a fresh object, like flow.error.msg
    mitm_internals.register_error(message, 504, b'{"x":1}', (("Retry-After", "1"),))
    raw = mitm_internals.json_error_response(502, message)
    assert raw.startswith(b"HTTP/1.1 504")
    assert b"Retry-After: 1" in raw
    assert raw.endswith(b'{"x":1}')


def test_connection_handler_can_close_a_server_connection():
    assert "close_connection" in dict(inspect.getmembers(server.ConnectionHandler))
    assert "transports" in inspect.getsource(server.ConnectionHandler.__init__)


def test_proxyserver_indexes_live_connections_by_client_id():
    from mitmproxy.addons.proxyserver import Proxyserver

    assert isinstance(Proxyserver().connections, dict)
