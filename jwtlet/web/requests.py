"""Reading what a request sent: its method, bounded body, media type, path segments and bearer token."""

from __future__ import annotations

from typing import Optional
from urllib.parse import unquote

from twisted.web.iweb import IRequest

from jwtlet.web.errors import APIError, method_not_allowed


def read_body(request: IRequest, limit: int) -> bytes:
    """
    The request body, refusing more than ``limit`` bytes (413).  The site has
    already refused an oversized body while it arrived; the check here keeps
    a handler's limit whatever serves it.
    """
    announced = request.getHeader(b"content-length")
    if announced is not None:
        try:
            if int(announced) > limit:
                raise APIError(413, {"error": "request_too_large"})
        except ValueError:
            raise APIError(400, {"error": "invalid content-length"}) from None
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(limit + 1)
    if len(body) > limit:
        raise APIError(413, {"error": "request_too_large"})
    return body


def media_type(request: IRequest) -> str:
    """The media type of the body, without parameters, lower-cased."""
    header = request.getHeader(b"content-type") or b""
    return header.split(b";", 1)[0].strip().decode("latin-1").lower()


def path_segments(request: IRequest, prefix: str) -> list[str]:
    """
    The segments of the request path after ``prefix``, each percent-decoded on
    its own, so that an encoded ``/`` (``%2F``) stays inside its segment.
    """
    raw = request.path.decode("ascii", "replace")
    rest = raw[len(prefix):] if raw.startswith(prefix) else ""
    return [unquote(segment, errors="strict") for segment in rest.split("/") if segment != ""]


def bearer_token(header: Optional[bytes]) -> Optional[str]:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if not header:
        return None
    try:
        scheme, _, token = header.decode("ascii").partition(" ")
    except UnicodeDecodeError:
        return None
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


# Routes over a path whose shape decides the methods take every method and
# check it themselves, so that 405 and its Allow header fit the shape.
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def method_of(request: IRequest, *allowed: str) -> str:
    """
    The method a handler branches on: 405 with ``Allow`` unless the request
    uses one of ``allowed``, and ``HEAD`` answered as ``GET`` (Twisted drops
    the body).  werkzeug routes ``HEAD`` to every rule that serves ``GET``;
    a handler that compared the raw method with ``GET`` sent ``HEAD`` down
    its write branch, so handlers compare only this value.
    """
    method = request.method.decode("ascii", "replace")
    permitted = set(allowed) | ({"HEAD"} if "GET" in allowed else set())
    if method not in permitted:
        raise method_not_allowed(*sorted(permitted))
    return "GET" if method == "HEAD" else method
