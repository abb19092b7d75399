"""
Envoy ext_authz HTTP mode, under ``/ext_authz/`` on the token exchange port:
200 with ``authorization: Bearer <new>`` to allow, the deny status with a
JSON body, 503 when a dependency is down (Envoy then applies its own
``failure_mode_allow``/``status_on_error``).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from klein import Klein
from twisted.web.iweb import IRequest

from jwtlet.extauthz.decide import ExtAuthz
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.web.responses import json_response, retry_after

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]


@attrs.define
class ExtAuthzHTTP:
    app: ClassVar[Klein] = Klein()

    decider: ExtAuthz

    @app.route("/", branch=True, methods=_METHODS)
    async def check(self, request: IRequest) -> bytes:
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        try:
            decision = await self.decider.check(headers, "http")
        except DependencyUnavailable as down:
            return json_response(request, {"error": "temporarily_unavailable"}, 503,
                                 retry_after(down.retry_after))
        if decision.allowed:
            request.setHeader(b"authorization", f"Bearer {decision.token}".encode())
            request.setResponseCode(200)
            return b""
        refusal = "unauthorized" if decision.status == 401 else "forbidden"
        return json_response(request, {"error": refusal}, decision.status)
