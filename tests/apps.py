"""
Building the two Klein apps in memory, with the memory store, a local key and
a static validator, for StubTreq tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs
from treq.testing import StubTreq
from twisted.internet.task import Clock

from jwtlet import config as configuration
from jwtlet import keys
from jwtlet.daemon.plugins import Providers
from jwtlet.daemon.wiring import build_apis
from jwtlet.discovery import build, discover
from jwtlet.interfaces import PluginContext
from jwtlet.metrics import Metrics
from jwtlet.providers import Store, adapt
from jwtlet.testing.fakes import StaticValidator, service_account
from jwtlet.web import management_api, token_api
from jwtlet.web.management_api import ManagementAPI
from jwtlet.web.server import BodyLimits, DrainingSite
from jwtlet.web.token_api import TokenExchangeAPI

CLIENT_AUDIENCE = "https://kubernetes.test"
ADMIN = service_account("platform", "admin")
READER = service_account("platform", "reader")
WRITER = service_account("platform", "writer")
WORKLOAD = service_account("ns", "workload")

BASE_CONFIG = {
    "issuer": "https://jwtlet.test",
    "token": {"client_audience": CLIENT_AUDIENCE, "audience": "default-aud", "token_ttl_secs": 600},
    "storage_backend": {"type": "memory"},
    "validator": {"type": "kubernetes-oidc", "issuers": []},
    "signer": {"type": "local-key"},
    "service_accounts": {
        ADMIN.username: ["management:write"],
        READER.username: ["jwtlet:management:read"],
        WRITER.username: ["jwtlet:management:mappings:write"],
    },
}


@attrs.define
class Apps:
    clock: Clock
    validator: StaticValidator
    providers: Providers
    metrics: Metrics
    token_api: TokenExchangeAPI
    management_api: ManagementAPI
    token: StubTreq
    management: StubTreq

    def store(self) -> Store:
        return self.providers.store


def make_apps(tmp_path: Path, overrides: Optional[dict[str, Any]] = None) -> Apps:
    keys.write_new(tmp_path / "signing.jwk", keys.generate("EdDSA"))
    raw = configuration.merge(BASE_CONFIG, {"signer": {"key_file": str(tmp_path / "signing.jwk")}})
    raw = configuration.merge(raw, overrides or {})
    config = configuration.parse(raw, data_dir=tmp_path)
    clock = Clock()
    clock.advance(1_800_000_000)
    context = PluginContext(
        reactor=clock, clock=clock, http_client=None, config=config, data_dir=tmp_path
    )
    discovered = discover()
    validator = StaticValidator()
    providers = Providers(
        store=build(discovered, "store", config.storage_backend, context),
        signer=build(discovered, "signer", config.signer, context),
        validator=adapt("validator", validator),
    )
    for identity in (ADMIN, READER, WRITER, WORKLOAD):
        validator.add(f"token-{identity.name}", identity, CLIENT_AUDIENCE)
    metrics = Metrics()
    apis = build_apis(config, providers, clock, metrics, random_bytes=lambda n: bytes(range(n)))
    return Apps(
        clock=clock,
        validator=validator,
        providers=providers,
        metrics=metrics,
        token_api=apis.token_api,
        management_api=apis.management_api,
        token=served(apis.token_api.app.resource(), token_api.BODY_LIMITS),
        management=served(apis.management_api.app.resource(), BodyLimits(management_api.MAX_BODY)),
    )


def served(resource: Any, body_limits: BodyLimits) -> StubTreq:
    """
    A StubTreq whose requests reach ``resource`` through the daemon's own
    :class:`DrainingSite` (its Request class, body limits, no form parsing)
    instead of the plain Site treq builds, so a test sees what a client of
    the daemon sees.  treq has no public way to pass the Site in.
    """
    stub = StubTreq(resource)
    agent = stub._agent  # type: ignore[attr-defined]
    agent._serverFactory = DrainingSite(resource, body_limits=body_limits, reactor=agent._memoryReactor)
    return stub



def result_of(stub: StubTreq, deferred: Any) -> Any:
    """Run the in-memory request to completion and return its result."""
    stub.flush()
    results: list[Any] = []
    deferred.addBoth(results.append)
    stub.flush()
    assert results, "the request did not complete"
    outcome = results[0]
    if hasattr(outcome, "raiseException"):
        outcome.raiseException()
    return outcome


@attrs.frozen
class Reply:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def call(stub: StubTreq, method: str, url: str, **kwargs: Any) -> Reply:
    response = result_of(stub, stub.request(method, url, **kwargs))
    body = result_of(stub, response.content())
    return Reply(response.code, response.headers, body)
