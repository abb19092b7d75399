"""
JSON responses on the wire: each one says its length (``Content-Length``),
so Twisted never frames it in chunks, and the body is exactly the JSON.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.iweb import IRequest

from jwtlet.web.responses import NO_STORE, json_response
from jwtlet.web.server import DrainingSite

BODY = {"access_token": "a.b.c", "token_type": "Bearer", "note": "ünïcode"}


def serve(request_bytes: bytes) -> bytes:
    app = Klein()

    @app.route("/token", methods=["GET", "POST"])
    def token(request: IRequest) -> bytes:
        return json_response(request, BODY, 200, NO_STORE)

    site = DrainingSite(app.resource())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request_bytes)
    return transport.value()


def test_a_json_response_carries_its_length_and_is_not_chunked() -> None:
    head, _, body = serve(b"GET /token HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")
    headers = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}
    assert b"transfer-encoding" not in headers
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == BODY
    assert headers[b"cache-control"] == b"no-store"


def test_a_head_request_gets_the_length_of_the_body_it_does_not_get() -> None:
    head, _, body = serve(b"HEAD /token HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")
    length = int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])[b"Content-Length"])
    assert body == b""
    assert length == len(json.dumps(BODY, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
