"""The fake Vault on a loopback port, and signers built against it."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, AsyncIterator

from twisted.internet import reactor

from jwtlet.plugins.vault_transit import VaultTransitSigner, vault_transit
from jwtlet.testing.loopback import LoopbackServer, serve
from jwtlet.testing.vault import FakeVault

ROOT = "root-token"


class RunningVault:
    def __init__(self, fake: FakeVault, server: LoopbackServer):
        self.fake = fake
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url


async def running_vault(clock: Any = None) -> AsyncIterator[RunningVault]:
    fake = FakeVault(clock=clock, reactor=reactor)
    fake.add_token(ROOT)
    server = await serve(reactor, fake.app.resource())
    try:
        yield RunningVault(fake, server)
    finally:
        await server.stop()


def signer_context(tmp_path: Path, clock: Any = None, token_ttl: int = 600) -> types.SimpleNamespace:
    sa_token = tmp_path / "sa-token"
    if not sa_token.exists():
        sa_token.write_text("kubernetes-sa-jwt")
    config = types.SimpleNamespace(token=types.SimpleNamespace(token_ttl_secs=token_ttl),
                                   k8s=types.SimpleNamespace(token_file=str(sa_token)), dev=False)
    return types.SimpleNamespace(reactor=reactor, clock=clock or reactor, config=config,
                                 http_client=None, data_dir=tmp_path)


def build_signer(tmp_path: Path, vault: RunningVault, clock: Any = None, token_ttl: int = 600,
                 **options: Any) -> VaultTransitSigner:
    settings: dict[str, Any] = {"url": vault.url, "token": ROOT, "key_name": "jwt", "key_refresh_secs": 60}
    settings.update(options)
    return vault_transit.build(settings, signer_context(tmp_path, clock, token_ttl))
