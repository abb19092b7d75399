"""
Envoy as an ext_authz client, for tests: the HTTP mode forwards only what
Envoy forwards and applies Envoy's reading of the answer; the gRPC helper
builds the CheckRequest Envoy sends (lower-cased headers, pseudo-headers).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import attrs


@attrs.frozen
class EnvoyOutcome:
    """What Envoy does with the request: forward it (with these headers) or answer ``status``."""

    allowed: bool
    status: int
    upstream_headers: Mapping[str, str]
    body: bytes = b""


async def http_check(
    http_client: Any,
    service_url: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    path_prefix: str = "/ext_authz",
    allowed_headers: Sequence[str] = (),
    allowed_upstream_headers: Sequence[str] = ("authorization",),
    status_on_error: int = 403,
    failure_mode_allow: bool = False,
) -> EnvoyOutcome:
    """One check in Envoy's HTTP service mode (``ext_authz_http_impl.cc``)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    forwarded = {"content-length": "0"}
    for name in ("authorization", "host", *[h.lower() for h in allowed_headers]):
        if name in lowered:
            forwarded[name] = lowered[name]
    response = await http_client.request(method, service_url + path_prefix + path,
                                         headers={k: [v] for k, v in forwarded.items()})
    body = await response.content()
    upstream = dict(lowered)
    if response.code == 200:
        for name in allowed_upstream_headers:
            values = response.headers.getRawHeaders(name)
            if values:
                upstream[name.lower()] = values[-1]
        return EnvoyOutcome(True, 200, upstream)
    if response.code >= 500:
        return EnvoyOutcome(failure_mode_allow, 200 if failure_mode_allow else status_on_error, lowered, body)
    return EnvoyOutcome(False, response.code, lowered, body)


def check_request(
    headers: Mapping[str, str],
    method: str = "GET",
    path: str = "/api/v1/namespaces",
    host: str = "mgmt.example:6443",
    context_extensions: Optional[Mapping[str, str]] = None,
) -> Any:
    """A CheckRequest as Envoy builds it for gRPC mode."""
    from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2 as external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = path
    http.host = host
    http.protocol = "HTTP/1.1"
    all_headers = {":method": method, ":path": path, ":authority": host, **headers}
    for name, value in all_headers.items():
        http.headers[name.lower()] = value
    for key, value in (context_extensions or {}).items():
        request.attributes.context_extensions[key] = value
    return request
