"""Serve a Klein app or any resource on an ephemeral loopback port."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import IResource
from twisted.web.server import Site


@attrs.define
class LoopbackServer:
    """A listening site; ``url`` has no trailing slash."""

    port: Any
    url: str

    def stop(self) -> Deferred[None]:
        """Stop listening (again is fine); open connections stay until their clients close them."""
        return maybeDeferred(self.port.stopListening)


async def serve(reactor: Any, resource: IResource) -> LoopbackServer:
    """Listen on ``127.0.0.1`` on a free port and serve ``resource``."""
    site = Site(resource)
    site.displayTracebacks = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    address = port.getHost()
    return LoopbackServer(port=port, url=f"http://127.0.0.1:{address.port}")
