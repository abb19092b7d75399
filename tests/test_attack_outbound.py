"""
Attacks on jwtlet's outbound calls: a peer (or whoever answers for it)
redirects a request that carries a credential to an origin it controls, or
the configuration points the Vault token at a plain-http remote host.  No
credential ever reaches the redirect's target, and the configuration is
refused before anything is sent.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from vault_fixtures import ROOT, RunningVault, build_signer

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError
from jwtlet.outbound import OutboundHTTPClient
from jwtlet.plugins.vault_transit import VaultMisconfigured, vault_transit
from jwtlet.testing.loopback import LoopbackServer, serve
from jwtlet.testing.vault import FakeVault


@attrs.define
class Recorder(Resource):
    """The attacker's origin: records every request that reaches it."""

    isLeaf = True
    seen: list[tuple[bytes, dict[bytes, Sequence[bytes]]]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        self.seen.append((request.uri, dict(request.requestHeaders.getAllRawHeaders())))
        request.setHeader(b"Content-Type", b"application/json")
        return b"{}"


@attrs.define
class Redirector(Resource):
    """Answers every request with a 307 to the same path on ``target``."""

    isLeaf = True
    target: str = ""
    #: the X-Vault-Token of each request it redirected
    tokens: list[bytes] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        self.tokens.extend(request.requestHeaders.getRawHeaders(b"x-vault-token", []))
        request.setResponseCode(307)
        request.setHeader(b"Location", self.target.encode() + request.uri)
        return b""


@attrs.define
class Trap:
    redirector: Redirector
    recorder: Recorder
    url: str


@pytest_twisted.async_yield_fixture
async def trap() -> AsyncIterator[Trap]:
    """A redirecting peer on one loopback port, the attacker's recorder on another."""
    recorder = Recorder()
    recording = await serve(reactor, recorder)
    redirector = Redirector(target=recording.url)
    redirecting = await serve(reactor, redirector)
    servers: list[LoopbackServer] = [recording, redirecting]
    try:
        yield Trap(redirector, recorder, redirecting.url)
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.parametrize("credential", [
    {"headers": {"Authorization": ["Bearer service-account-token"]}},
    {"headers": {b"x-vault-token": [b"hvs.secret"]}},
    {"headers": Headers({b"X-Vault-Token": [b"hvs.secret"]})},
    {"auth": ("user", "password")},
], ids=["bearer", "vault-token", "headers-object", "basic-auth"])
@pytest_twisted.ensureDeferred
async def test_a_peer_redirecting_a_credentialed_request_gets_its_redirect_ignored(
    trap: Trap, outbound_client: OutboundHTTPClient, credential: dict[str, Any]
) -> None:
    """The peer answers 307 to the attacker's origin: jwtlet stops at the 307, the attacker sees nothing."""
    response = await outbound_client.get(trap.url + "/openid/v1/jwks", **credential)
    await response.content()
    assert response.code == 307
    assert trap.recorder.seen == []


@pytest_twisted.ensureDeferred
async def test_the_same_redirect_without_a_credential_is_still_followed(
    trap: Trap, outbound_client: OutboundHTTPClient
) -> None:
    """The control: the trap works, so the test above would catch a credential that followed it."""
    response = await outbound_client.get(trap.url + "/public")
    await response.content()
    assert response.code == 200
    assert [uri for uri, _ in trap.recorder.seen] == [b"/public"]


@pytest_twisted.ensureDeferred
async def test_a_vault_redirecting_to_another_origin_never_hands_it_the_vault_token(
    tmp_path: Path, trap: Trap
) -> None:
    """Vault (or a proxy in front of it) answers 307 to another port: the token stays home and signing fails."""
    signer = build_signer(tmp_path, RunningVault(FakeVault(), LoopbackServer(None, trap.url)))
    try:
        with pytest.raises((VaultMisconfigured, DependencyUnavailable)):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
        with pytest.raises((VaultMisconfigured, DependencyUnavailable)):
            await signer.check_ready()
    finally:
        await signer.stopService()
    assert trap.redirector.tokens and set(trap.redirector.tokens) == {ROOT.encode()}, "Vault was asked"
    assert trap.recorder.seen == [], "the redirect's origin saw neither the token nor the request"


def _context(tmp_path: Path, dev: bool) -> Any:
    token = types.SimpleNamespace(token_ttl_secs=600, participant_context_claim="jwtlet_pc")
    config = types.SimpleNamespace(token=token,
                                   k8s=types.SimpleNamespace(token_file=str(tmp_path / "sa")), dev=dev)
    return types.SimpleNamespace(reactor=reactor, clock=reactor, config=config, http_client=None, data_dir=tmp_path)


@pytest.mark.parametrize("url", [
    "http://vault:8200", "http://10.0.0.5:8200", "http://vault.example.com", "http://127.0.0.1.attacker.example",
])
def test_a_vault_url_sending_the_token_in_clear_to_a_remote_host_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(PluginConfigError) as raised:
        vault_transit.build({"url": url, "token": "t"}, _context(tmp_path, dev=False))
    assert list(raised.value.messages) == ["url: must be https (http is allowed only for loopback hosts or with --dev)"]


@pytest.mark.parametrize("url", ["ftp://vault", "vault:8200", "https://", "http://[::1"])
def test_a_vault_url_that_is_not_an_http_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(PluginConfigError) as raised:
        vault_transit.build({"url": url, "token": "t"}, _context(tmp_path, dev=True))
    assert list(raised.value.messages) == ["url: must be an absolute https URL"]


@pytest.mark.parametrize("url", [None, "", 8200])
def test_a_vault_url_that_is_missing_is_refused(tmp_path: Path, url: Any) -> None:
    with pytest.raises(PluginConfigError) as raised:
        vault_transit.build({"url": url, "token": "t"}, _context(tmp_path, dev=True))
    assert list(raised.value.messages) == ["url: required for vault-transit (an https URL)"]


@pytest.mark.parametrize("url, dev", [
    ("https://vault:8200", False), ("http://127.0.0.1:8200", False), ("http://[::1]:8200", False),
    ("http://localhost:8200", False), ("http://vault:8200", True),
])
def test_https_or_loopback_or_dev_vault_urls_are_accepted(tmp_path: Path, url: str, dev: bool) -> None:
    signer = vault_transit.build({"url": url, "token": "t"}, _context(tmp_path, dev=dev))
    assert signer.options.url == url
