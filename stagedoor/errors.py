"""Backstage-shaped error bodies and the response headers stagedoor adds (docs/behaviour.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

JSON_CONTENT_TYPE = "application/json; charset=utf-8"

ERROR_NAMES: dict[int, str] = {
    400: "InputError",
    401: "AuthenticationError",
    403: "NotAllowedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "PayloadTooLargeError",
    415: "UnsupportedMediaTypeError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "Error",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

# What Backstage's helmet middleware adds to every response (docs/behaviour.md, "Response headers").
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;"
        "form-action 'self';frame-ancestors 'self';img-src 'self' data:;"
        "object-src 'none';script-src 'self';script-src-attr 'none';"
        "style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests"
    ),
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=15552000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-DNS-Prefetch-Control": "off",
    "X-Download-Options": "noopen",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Permitted-Cross-Domain-Policies": "none",
    "X-XSS-Protection": "0",
}


@dataclass(frozen=True, slots=True)
class ApiError:
    """A denial or fault, before it is rendered: status, Backstage error name, message."""

    status: int
    message: str
    name: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def error_name(self) -> str:
        return self.name or ERROR_NAMES.get(self.status, "Error")


_ESCAPED_BYTES = re.compile(r"[^\ud800-\udc7f\udd00-\udfff]*")  # lone surrogates: \udc80-ff


def utf8_safe(text: str) -> str:
    """``text`` as it can go into a UTF-8 body. mitmproxy hands over request bytes that are not
    UTF-8 as lone surrogates (``\\udce9``), which no UTF-8 encoder takes; they are shown as
    ``\\xe9`` instead (other lone surrogates as ``\\ud800``)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        errors = "surrogateescape" if _ESCAPED_BYTES.fullmatch(text) else "backslashreplace"
        return text.encode("utf-8", errors).decode("utf-8", "backslashreplace")


def error_body(status: int, name: str, message: str, method: str, url: str) -> bytes:
    """The JSON body Backstage's error handler writes (no stack, ever). Never raises."""
    return json.dumps(
        {
            "error": {"name": utf8_safe(name), "message": utf8_safe(message)},
            "request": {"method": utf8_safe(method), "url": utf8_safe(url)},
            "response": {"statusCode": status},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


def render_error(
    error: ApiError, method: str, url: str
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers (content type, error-specific headers) for an :class:`ApiError`."""
    headers = [("Content-Type", JSON_CONTENT_TYPE), *error.headers]
    if error.status == 401 and not any(k.lower() == "www-authenticate" for k, _ in error.headers):
        headers.append(("WWW-Authenticate", "Bearer"))
    body = error_body(error.status, error.error_name, error.message, method, url)
    return error.status, body, headers
