"""
Peers served in memory: a treq ``HTTPClient`` whose requests reach Klein apps
(or any ``IResource``) with no socket and no global reactor, for unit tests of
code that calls other services.  Each request still goes through a real
``twisted.web`` ``Site`` and Twisted's HTTP/1.1 client parser, over the
in-memory transport of ``treq.testing.RequestTraversalAgent``; only the
network is gone.  End-to-end tests use :mod:`jwtlet.testing.loopback`, which
is real HTTP.

::

    network = MemoryNetwork()
    server = network.serve("https://kubernetes.test", fake.resource())
    validator = build(..., http_client=network.client())
    server.stop()        # from now on: connection refused

A request completes before ``request`` returns when the resource answers at
once (every fake in :mod:`jwtlet.testing` does); a resource that answers
later needs :meth:`MemoryNetwork.flush` once it has.
"""

from __future__ import annotations

from typing import Optional

import attrs
from treq.client import HTTPClient

# StubTreq builds its client with ``_SynchronousProducer`` too: it writes a
# request body at once, so the request is complete when ``request`` returns.
# Twisted's own producer writes through the global cooperator, after the
# in-memory transport has stopped pumping, and the body would never arrive.
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource
from zope.interface import implementer

Origin = tuple[bytes, bytes, int]


def _origin(url: bytes) -> Origin:
    parsed = URI.fromBytes(url)
    return (parsed.scheme, parsed.host, parsed.port)


@attrs.define
class MemoryServer:
    """
    One origin of a :class:`MemoryNetwork`, answered by one resource.  Like
    :class:`jwtlet.testing.loopback.LoopbackServer`: ``url`` (no trailing
    slash) and ``stop()``.
    """

    url: str
    agent: RequestTraversalAgent
    listening: bool = True

    def stop(self) -> Deferred[None]:
        """Stop answering: a request to ``url`` now fails as a refused connection does."""
        self.listening = False
        return succeed(None)

    def start(self) -> None:
        """Answer again (a peer back from an outage)."""
        self.listening = True


@implementer(IAgent)
@attrs.define
class MemoryNetwork:
    """
    An ``IAgent`` that delivers each request to the server of its origin
    (scheme, host, port).  A request to an origin nobody serves fails as an
    unknown host does, unless ``fallback`` (a real ``Agent``) is given for
    those.
    """

    fallback: Optional[IAgent] = None
    _servers: dict[Origin, MemoryServer] = attrs.field(factory=dict, init=False)

    def serve(self, url: str, resource: IResource) -> MemoryServer:
        """Answer requests to ``url``'s origin with ``resource``."""
        server = MemoryServer(url=url.rstrip("/"), agent=RequestTraversalAgent(resource))
        self._servers[_origin(url.encode("ascii"))] = server
        return server

    def client(self) -> HTTPClient:
        """A treq client over this network, to hand to the code under test."""
        return HTTPClient(self, data_to_body_producer=_SynchronousProducer)

    def flush(self) -> None:
        """Deliver what resources that answer late (``NOT_DONE_YET``) have written since."""
        for server in self._servers.values():
            server.agent.flush()

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        server = self._servers.get(_origin(uri))
        if server is None:
            if self.fallback is not None:
                return self.fallback.request(method, uri, headers, bodyProducer)
            return fail(DNSLookupError(uri.decode("ascii", "replace")))
        if not server.listening:
            return fail(ConnectionRefusedError(server.url))
        response: Deferred[IResponse] = server.agent.request(method, uri, headers, bodyProducer)
        return response
