"""
The baseline of the benchmark: a minimal Klein app with one POST route that
returns a constant JSON body, on the default reactor, as jwtlet runs.

    python bench/baseline.py PORT
"""

from __future__ import annotations

import sys

from klein import Klein
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.iweb import IRequest
from twisted.web.server import Site

BODY = b'{"access_token":"x","token_type":"Bearer","expires_in":3600}'


class Baseline:
    app = Klein()

    @app.route("/token", methods=["POST"])
    def token(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return BODY


def main(port: int) -> None:
    site = Site(Baseline().app.resource())
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
    print(f"baseline listening on {port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]))
