"""
Two daemons on one PostgreSQL database: a mapping created through one is used
by the other, and a mapping deleted through one stops working on the other
within a second.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
import yaml
from postgres_fixtures import postgres_server, postgres_url  # noqa: F401 - fixtures
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from jwtlet.daemon import dev
from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.process import DaemonProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def write_config(tmp_path: Path, url: str) -> Path:
    dev.ensure(tmp_path)
    config = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "postgres", "url": url, "pool": {"max_connections": 4}},
        "validator": dev.defaults(tmp_path)["validator"],
        "token": {"client_audience": "jwtlet-dev", "audience": "svc"},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk"), "generate": True},
        "service_accounts": {"system:serviceaccount:ops:admin": ["management:write"]},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def exchange_code(daemon: DaemonProcess, tmp_path: Path) -> int:
    subject = dev.mint(tmp_path, "apps", "web", int(time.time()))
    response = await treq.post(f"{daemon.token_url}/token", data={
        "grant_type": GRANT, "subject_token": subject, "resource": "shared-ctx"})
    await response.content()
    return int(response.code)


@pytest_twisted.ensureDeferred
async def test_two_replicas_share_one_database(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    config = write_config(tmp_path, postgres_url)
    one = DaemonProcess.start(["--config", str(config)], cwd=tmp_path)
    two = DaemonProcess.start(["--config", str(config)], cwd=tmp_path)
    try:
        await deferToThread(one.wait_listening)
        await deferToThread(two.wait_listening)
        admin = {"Authorization": f"Bearer {dev.mint(tmp_path, 'ops', 'admin', int(time.time()))}"}
        mapping = {"clientIdentifier": "system:serviceaccount:apps:web", "participantContext": "shared-ctx",
                   "scopes": []}
        response = await treq.post(f"{one.management_url}/api/v1/mappings", headers=admin, json=mapping)
        assert response.code == 201, await response.content()
        assert await exchange_code(two, tmp_path) == 200, "created through one, used by the other"
        response = await treq.delete(f"{one.management_url}/api/v1/mappings/"
                                     "system%3Aserviceaccount%3Aapps%3Aweb/shared-ctx", headers=admin)
        assert response.code == 204
        started = reactor.seconds()
        while await exchange_code(two, tmp_path) != 403:
            assert reactor.seconds() - started < 1.0, "a replica served a deleted mapping for over a second"
            await deferLater(reactor, 0.05, lambda: None)
        listed = await treq.get(f"{two.management_url}/api/v1/mappings", headers=admin)
        assert json.loads(await listed.content()) == []
    finally:
        codes = [await deferToThread(daemon.stop, signal.SIGTERM) for daemon in (one, two)]
    assert all(code in (0, -signal.SIGTERM) for code in codes)
