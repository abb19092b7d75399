"""
The outbound HTTP client: a pooled connection the server has closed does not
fail the next idempotent request (the JWKS fetched right after discovery), a
non-idempotent one is never sent twice, and the pool closes.  (A credential
never following a redirect is in test_attack_outbound.py.)
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers

from jwtlet.outbound import OutboundHTTPClient, build_http_client, carries_credential, close_http_client

DISCOVERY = b'{"issuer": "https://kubernetes.default.svc", "jwks_uri": "/openid/v1/jwks"}'


@attrs.define
class OneShotServer:
    """
    Answers the first request on each connection (HTTP/1.1, ``Content-Length``,
    no ``Connection: close``) and drops any connection the client reuses,
    without a response.  That is what a server closing every connection after
    its response (HTTP/1.0 style, or an idle timeout) looks like to a client
    that reused the connection before it saw the close, made deterministic.
    """

    answered: list[bytes] = attrs.field(factory=list)
    dropped: int = 0
    port: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def protocol(self) -> Protocol:
        server = self

        class OneShot(Protocol):
            def __init__(self) -> None:
                self.buffer = b""
                self.served = False

            def dataReceived(self, data: bytes) -> None:
                transport: Any = self.transport
                self.buffer += data
                if b"\r\n\r\n" not in self.buffer:
                    return
                head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                if self.served:
                    server.dropped += 1
                    transport.abortConnection()
                    return
                self.served = True
                server.answered.append(head.split(b"\r\n")[0])
                transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(DISCOVERY), DISCOVERY))

        return OneShot()


@pytest_twisted.async_yield_fixture
async def one_shot() -> AsyncIterator[OneShotServer]:
    server = OneShotServer()
    server.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(server.protocol))
    try:
        yield server
    finally:
        await server.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_jwks_fetched_right_after_discovery_survives_a_server_that_closes_connections(
    one_shot: OneShotServer, outbound_client: OutboundHTTPClient
) -> None:
    """Discovery, then the JWKS on the pooled connection the server already dropped: both succeed."""
    headers = Headers({b"Authorization": [b"Bearer sa-token"]})
    discovery = await outbound_client.get(one_shot.url + "/.well-known/openid-configuration", headers=headers)
    assert discovery.code == 200 and await discovery.content() == DISCOVERY
    jwks = await outbound_client.get(one_shot.url + "/openid/v1/jwks", headers=headers)
    assert jwks.code == 200
    await jwks.content()
    assert one_shot.dropped == 1, "the second request was first tried on the reused, dropped connection"
    assert one_shot.answered == [b"GET /.well-known/openid-configuration HTTP/1.1", b"GET /openid/v1/jwks HTTP/1.1"]


@pytest_twisted.ensureDeferred
async def test_a_post_on_a_dropped_connection_is_not_sent_again(
    one_shot: OneShotServer, outbound_client: OutboundHTTPClient
) -> None:
    """A TokenReview is not idempotent: a lost connection is the caller's error, never a silent replay."""
    first = await outbound_client.post(one_shot.url + "/apis/authentication.k8s.io/v1/tokenreviews", data=b"{}")
    await first.content()
    with pytest.raises(ResponseNeverReceived):
        await outbound_client.post(one_shot.url + "/apis/authentication.k8s.io/v1/tokenreviews", data=b"{}")
    assert (len(one_shot.answered), one_shot.dropped) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_close_http_client_closes_the_pool(one_shot: OneShotServer) -> None:
    client = build_http_client(reactor)
    response = await client.get(one_shot.url + "/")
    await response.content()
    assert client.pool._connections, "the connection was kept for reuse"
    await close_http_client(client)
    assert not client.pool._connections


@pytest.mark.parametrize("headers, expected", [
    (None, False),
    ({"Accept": ["application/json"]}, False),
    ({"Authorization": ["Bearer t"]}, True),
    ({b"authorization": [b"Bearer t"]}, True),
    ({"X-VAULT-TOKEN": "t"}, True),
    (Headers({b"X-Vault-Token": [b"t"]}), True),
    (Headers({b"Content-Type": [b"application/json"]}), False),
])
def test_credential_headers_are_recognised_in_every_form_treq_takes(headers: Any, expected: bool) -> None:
    assert carries_credential(headers) is expected
