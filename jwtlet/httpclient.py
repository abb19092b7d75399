"""
Outbound HTTP clients: one persistent connection pool per peer, with TLS that
trusts the system store plus an optional extra CA file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from jwtlet.interfaces import DependencyUnavailable


def tls_policy(ca_file: Optional[str]) -> IPolicyForHTTPS:
    """
    Trust the platform's CAs, plus those in ``ca_file`` when it exists (the
    in-cluster ``ca.crt`` is optional outside a pod).
    """
    if ca_file and Path(ca_file).is_file():
        pem = Path(ca_file).read_bytes()
        authorities = [
            ssl.Certificate.loadPEM(block)
            for block in _pem_blocks(pem)
        ]
        trust = ssl.trustRootFromCertificates(authorities)
        return BrowserLikePolicyForHTTPS(trustRoot=trust)
    return BrowserLikePolicyForHTTPS()


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [
        chunk + marker
        for chunk in pem.split(marker)
        if b"-----BEGIN CERTIFICATE-----" in chunk
    ]


def build_http_client(
    reactor: Any,
    ca_file: Optional[str] = None,
    max_per_host: int = 16,
    connect_timeout: float = 5.0,
) -> HTTPClient:
    """
    A treq client with its own persistent pool.  Close it with
    ``client._agent._pool.closeCachedConnections()`` via :func:`close_http_client`.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False
    agent = Agent(
        reactor,
        contextFactory=tls_policy(ca_file),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    client = HTTPClient(agent)
    client._jwtlet_pool = pool  # type: ignore[attr-defined]
    return client


def close_http_client(client: HTTPClient) -> Any:
    """Close the pooled connections of a client made by :func:`build_http_client`."""
    pool: Optional[HTTPConnectionPool] = getattr(client, "_jwtlet_pool", None)
    if pool is None:
        return None
    return pool.closeCachedConnections()


async def post_json(
    client: HTTPClient, url: str, body: Any, bearer: str, timeout: float, clock: Any, peer: str
) -> tuple[int, Any]:
    """
    POST ``body`` as JSON with a bearer token; the status and the decoded
    answer (``None`` when it is not JSON).  Connection failures and timeouts
    are :class:`DependencyUnavailable`, named after ``peer``.
    """
    headers: dict[Any, Any] = {"Authorization": [f"Bearer {bearer}"], "Content-Type": ["application/json"],
                               "Accept": ["application/json"]}
    try:
        response = await client.post(
            url,
            data=json.dumps(body).encode(),
            headers=headers,
            timeout=timeout,
            reactor=clock,
        )
        content = await response.content()
    except CancelledError:
        raise DependencyUnavailable(f"{peer}: timed out") from None
    except Exception as error:
        raise DependencyUnavailable(f"{peer}: {type(error).__name__}") from None
    try:
        return response.code, json.loads(content)
    except ValueError:
        return response.code, None
