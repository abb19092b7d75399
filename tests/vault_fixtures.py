"""
The fake Vault on a loopback port, signers built against it (or against a
real OpenBao), and the daemon's Vault-signed exchange scenario that runs
against either.
"""

from __future__ import annotations

import json
import signal
import time
import types
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

import jwt as pyjwt
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from jwtlet.daemon import dev as devissuer
from jwtlet.daemon.dev import defaults as dev_defaults
from jwtlet.plugins.vault_transit import VaultTransitSigner, vault_transit
from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.loopback import LoopbackServer, serve
from jwtlet.testing.process import DaemonProcess
from jwtlet.testing.vault import FakeVault

ROOT = "root-token"


class VaultServer(Protocol):
    """A Vault to sign with: the fake or a real OpenBao."""

    @property
    def url(self) -> str: ...


class VaultControl(Protocol):
    """What the daemon scenario does to a Vault behind the daemon's back."""

    def seal(self) -> None: ...

    def unseal(self) -> None: ...

    def rotate(self, name: str) -> None: ...


class RunningVault:
    def __init__(self, fake: FakeVault, server: LoopbackServer):
        self.fake = fake
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def seal(self) -> None:
        self.fake.sealed = True

    def unseal(self) -> None:
        self.fake.sealed = False

    def rotate(self, name: str) -> None:
        self.fake.keys[name].rotate()


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
    config = types.SimpleNamespace(token=types.SimpleNamespace(token_ttl_secs=token_ttl,
                                                               participant_context_claim="jwtlet_pc"),
                                   k8s=types.SimpleNamespace(token_file=str(sa_token)), dev=False)
    return types.SimpleNamespace(reactor=reactor, clock=clock or reactor, config=config,
                                 http_client=None, data_dir=tmp_path)


def build_signer(tmp_path: Path, vault: VaultServer, clock: Any = None, token_ttl: int = 600,
                 **options: Any) -> VaultTransitSigner:
    settings: dict[str, Any] = {"url": vault.url, "token": ROOT, "key_name": "jwt", "key_refresh_secs": 60}
    if clock is not None:
        # A batch waits on the signer's clock: a Clock nobody advances would
        # hold every sign.  Tests of batching give a window and advance it.
        settings["batch_window_ms"] = 0
    settings.update(options)
    return vault_transit.build(settings, signer_context(tmp_path, clock, token_ttl))


# -- the daemon signing with a Vault ----------------------------------------------------------


def daemon_config(tmp_path: Path, url: str, token: str, **vault_options: Any) -> Path:
    devissuer.ensure(tmp_path)
    vault = {"url": url, "token": token, "key_name": "jwtlet", "key_refresh_secs": 1, "publish_before_use_secs": 3,
             "timeout_secs": 2}
    vault.update(vault_options)
    config = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")},
        "validator": dev_defaults(tmp_path)["validator"],
        "token": {"client_audience": "jwtlet-dev", "audience": "svc", "token_ttl_secs": 300},
        "vault": vault,
        "service_accounts": {"system:serviceaccount:ops:admin": ["management:write"]},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def exchange(daemon: DaemonProcess, tmp_path: Path) -> Any:
    subject = devissuer.mint(tmp_path, "apps", "web", int(time.time()))
    response = await treq.post(f"{daemon.token_url}/token", data={
        "grant_type": GRANT, "subject_token": subject, "resource": "web-ctx"})
    return response.code, response.headers, json.loads(await response.content())


async def verify(daemon: DaemonProcess, token: str) -> dict[str, Any]:
    response = await treq.get(f"{daemon.token_url}/.well-known/jwks.json")
    published = {k["kid"]: k for k in json.loads(await response.content())["keys"]}
    header = pyjwt.get_unverified_header(token)
    key = published[header["kid"]]
    return dict(pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=[key["alg"]], audience="svc"))


async def vault_signed_exchange_outage_and_rotation(tmp_path: Path, config: Path, vault: VaultControl) -> None:
    """
    The daemon on ``config`` (key ``jwtlet``, publish_before_use_secs 3):
    tokens verify from the JWKS, a sealed Vault is 503 and the daemon recovers
    by itself, a rotation is published at once and signs 3 s after it.
    """
    daemon = DaemonProcess.start(["--config", str(config)], cwd=tmp_path)
    try:
        await deferToThread(daemon.wait_listening)
        admin = devissuer.mint(tmp_path, "ops", "admin", int(time.time()))
        response = await treq.post(
            f"{daemon.management_url}/api/v1/mappings", headers={"Authorization": f"Bearer {admin}"},
            json={"clientIdentifier": "system:serviceaccount:apps:web", "participantContext": "web-ctx",
                  "scopes": []})
        assert response.code == 201, await response.content()
        code, _, body = await exchange(daemon, tmp_path)
        assert code == 200, body
        assert (await verify(daemon, body["access_token"]))["sub"] == "web-ctx"
        assert pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-1"

        vault.seal()
        code, headers, body = await exchange(daemon, tmp_path)
        assert (code, body["error"]) == (503, "temporarily_unavailable")
        assert headers.getRawHeaders("retry-after") == ["5"]
        ready = await treq.get(f"{daemon.management_url}/ready")
        assert ready.code == 503
        assert json.loads(await ready.content())["checks"]["signer"].startswith("unavailable")
        vault.unseal()
        code, _, body = await exchange(daemon, tmp_path)
        assert code == 200, "recovered without a restart"

        vault.rotate("jwtlet")
        code, _, body = await exchange(daemon, tmp_path)
        assert pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-1", "published before use"
        for _ in range(200):
            await deferLater(reactor, 0.05, lambda: None)  # signs from 3 s after its creation
            code, _, body = await exchange(daemon, tmp_path)
            assert code == 200
            await verify(daemon, body["access_token"])  # every token verifies against the JWKS of that moment
            if pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-2":
                break
        else:
            raise AssertionError("the rotated version never signed")
        assert "Traceback" not in daemon.output()
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)


#: Every transit key type with the JWS algorithm it signs (RSA both ways): ``(key_type, rsa_algorithm, alg)``.
KEY_TYPES = [
    ("ed25519", "RS256", "EdDSA"),
    ("ecdsa-p256", "RS256", "ES256"),
    ("ecdsa-p384", "RS256", "ES384"),
    ("rsa-2048", "RS256", "RS256"),
    ("rsa-2048", "PS256", "PS256"),
    ("rsa-3072", "PS256", "PS256"),
    ("rsa-4096", "RS256", "RS256"),
]
