"""JSON responses, the one way both ports write a body."""

from __future__ import annotations

from typing import Mapping, Optional

from twisted.web.iweb import IRequest

from jwtlet import jsonout
from jwtlet.model import JSONValue

JSON = "application/json"
#: Token responses and token errors must never be cached (RFC 6749 §5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(
    request: IRequest,
    body: JSONValue,
    status: int = 200,
    headers: Optional[Mapping[str, str]] = None,
) -> bytes:
    """Set status, ``Content-Type``, ``Content-Length`` and extra headers; return the encoded body."""
    encoded = jsonout.dumps(body)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON.encode())
    # A known length spares Twisted's chunked framing of every response.
    request.setHeader(b"Content-Length", b"%d" % len(encoded))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return encoded


def retry_after(seconds: int) -> dict[str, str]:
    """The ``Retry-After`` header of a 429 or 503: whole seconds, at least one."""
    return {"Retry-After": str(max(1, int(seconds)))}
