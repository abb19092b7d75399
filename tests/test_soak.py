"""
A bounded soak on loopback: 60 s of exchanges with rotating subject tokens
and concurrent management writes against the daemon as a subprocess.  Only
expected answers, and neither memory nor file descriptors keep growing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

from jwtlet.daemon import dev as devissuer
from jwtlet.daemon.dev import defaults as dev_defaults
from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.process import DaemonProcess

pytestmark = pytest.mark.slow
SOAK_SECS = 60.0
WARM_UP_SECS = 10.0
CONCURRENCY = 8


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest_twisted.ensureDeferred
async def test_a_minute_of_rotating_tokens_and_writes(tmp_path: Path) -> None:
    devissuer.ensure(tmp_path)
    config = tmp_path / "jwtlet.yaml"
    config.write_text(yaml.safe_dump({
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")},
        "validator": dev_defaults(tmp_path)["validator"],
        "token": {"client_audience": "jwtlet-dev", "audience": "svc"},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "k.jwk"), "generate": True},
        "service_accounts": {"system:serviceaccount:ops:admin": ["management:write"]},
        "logging": {"level": "warn"},
    }))
    daemon = DaemonProcess.start(["--config", str(config)], cwd=tmp_path)
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = treq.client.HTTPClient(treq.api.Agent(reactor, pool=pool))  # type: ignore[attr-defined]
    counts: dict[str, int] = {}
    try:
        await deferToThread(daemon.wait_listening)
        admin = {"Authorization": f"Bearer {devissuer.mint(tmp_path, 'ops', 'admin', int(time.time()))}"}
        mapping = {"clientIdentifier": "system:serviceaccount:apps:web", "participantContext": "ctx", "scopes": []}
        assert (await client.post(f"{daemon.management_url}/api/v1/mappings", json=mapping, headers=admin)).code == 201
        now = int(time.time())
        subjects = [devissuer.mint(tmp_path, "apps", "web", now, ttl=3600) for _ in range(500)]
        deadline = reactor.seconds() + SOAK_SECS
        samples: dict[str, Any] = {}

        async def exchanger(offset: int) -> None:
            index = offset
            while reactor.seconds() < deadline:
                response = await client.post(f"{daemon.token_url}/token", data={
                    "grant_type": GRANT, "subject_token": subjects[index % len(subjects)], "resource": "ctx"})
                await response.content()
                counts[str(response.code)] = counts.get(str(response.code), 0) + 1
                index += CONCURRENCY
                if "start" not in samples and reactor.seconds() > deadline - SOAK_SECS + WARM_UP_SECS:
                    samples["start"] = (rss_kb(daemon.process.pid), open_fds(daemon.process.pid))

        async def writer() -> None:
            serial = 0
            while reactor.seconds() < deadline:
                serial += 1
                scope = {"scope": f"s{serial}", "claims": {"n": serial}}
                response = await client.post(f"{daemon.management_url}/api/v1/scopes", json=scope, headers=admin)
                await response.content()
                counts[f"write-{response.code}"] = counts.get(f"write-{response.code}", 0) + 1
                response = await client.delete(f"{daemon.management_url}/api/v1/scopes/s{serial}", headers=admin)
                await response.content()

        await gatherResults([ensureDeferred(exchanger(i)) for i in range(CONCURRENCY)] + [ensureDeferred(writer())])
        end = (rss_kb(daemon.process.pid), open_fds(daemon.process.pid))
        start = samples["start"]
        print(f"soak: {counts}; RSS {start[0]} -> {end[0]} kB; fds {start[1]} -> {end[1]}")
        assert set(counts) <= {"200", "write-201"}, counts
        assert counts["200"] > 1000
        assert end[0] - start[0] < 16 * 1024, "RSS kept growing after the warm-up"
        assert end[1] - start[1] <= 4, "file descriptors kept growing"
    finally:
        await pool.closeCachedConnections()
        await deferToThread(daemon.stop, signal.SIGTERM)
