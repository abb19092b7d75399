"""
Server spans for the Klein sites: one per request, named by its route
template (``POST /token``, ``GET /api/v1/mappings/<identifier>``), never by
its raw path, which may hold anything a client sent.
"""

from __future__ import annotations

from typing import Optional, cast

from klein.interfaces import IKleinRequest
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from jwtlet import tracing

#: Methods named as they are; any other is ``_OTHER`` (semantic conventions), so a client picks no span name.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def method_of(request: IRequest) -> str:
    method = request.method.decode("latin-1")
    return method if method in KNOWN_METHODS else "_OTHER"


def header_of(request: IRequest) -> tracing.HeaderLookup:
    def header(name: str) -> Optional[str]:
        value = request.getHeader(name.encode("ascii"))
        return None if value is None else value.decode("latin-1")

    return header


#: Past this many distinct (method, path) pairs (a client trying paths), the route cache starts over.
MAX_CACHED_ROUTES = 1024


class Routes:
    """
    The route template Klein matched for a request (``None``: none did, a
    404 or 405).  Klein keeps only the bound mapper, so the match is done
    again, once per method and path of the one resource these routes are
    of: werkzeug's matching would otherwise be a tenth of the cost of
    tracing a request.
    """

    def __init__(self) -> None:
        self.known: dict[tuple[bytes, bytes], Optional[str]] = {}

    def of(self, request: IRequest) -> Optional[str]:
        key = (request.method, cast(Request, request).path)
        try:
            return self.known[key]
        except KeyError:
            pass
        mapper = IKleinRequest(request).mapper
        if mapper is None:
            return None  # Klein refused the request before routing it (a path that is not UTF-8)
        try:
            rule, _ = mapper.match(return_rule=True)
            route: Optional[str] = str(rule.rule)
        except HTTPException:
            route = None
        if len(self.known) >= MAX_CACHED_ROUTES:
            self.known.clear()
        self.known[key] = route
        return route


@implementer(IResource)
class TracedResource(Resource):
    """
    A Klein app's resource whose every request is a server span.  The span
    is current while Klein starts the handler, so the handler's coroutine
    (Twisted gives each its own copy of the context) and every span it opens
    belong to it; it ends when the response does.
    """

    isLeaf = True

    def __init__(self, resource: IResource, tracer: tracing.Tracing):
        super().__init__()
        self.resource = resource
        self.tracer = tracer
        self.routes = Routes()

    def render(self, request: IRequest) -> object:
        answered = cast(Request, request)  # the site's requests are twisted.web's, whatever IRequest says
        method = method_of(request)
        span = self.tracer.server_span(method, {"http.request.method": method}, header_of(request))

        def finished(_: object) -> None:
            # Klein matched the route while rendering: the span gets its template now.
            route = self.routes.of(request)
            if route is not None:
                span.rename(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.end(answered.code)

        # Before rendering: a response written at once finishes the request inside render().
        answered.notifyFinish().addBoth(finished)
        with span.activate():
            return self.resource.render(request)


def traced(resource: IResource, tracer: tracing.Tracing) -> IResource:
    """``resource`` with server spans when ``tracer`` records, else ``resource`` itself (no cost at all)."""
    return TracedResource(resource, tracer) if tracer.enabled else resource
