"""Serving the fake Kubernetes API server on loopback for validator tests."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, AsyncIterator

from twisted.internet import reactor

from jwtlet.outbound import build_http_client, close_http_client
from jwtlet.testing.kubernetes import FakeKubernetes
from jwtlet.testing.loopback import LoopbackServer, serve

CLIENT_AUDIENCE = "jwtlet-test"


class Cluster:
    """A fake API server on a loopback port, with a client pool to reach it."""

    def __init__(self, fake: FakeKubernetes, server: LoopbackServer, client: Any):
        self.fake = fake
        self.server = server
        self.client = client

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        await close_http_client(self.client)
        await self.server.stop()


async def start_cluster(clock: Any = None) -> Cluster:
    fake = FakeKubernetes(clock=clock)
    server = await serve(reactor, fake.app.resource())
    fake.url = server.url
    fake.issuer = server.url
    return Cluster(fake, server, build_http_client(reactor))


def plugin_context(tmp_path: Path, cluster: Cluster, clock: Any = None, dev: bool = False,
                   max_age: int = 86400, **k8s: Any) -> types.SimpleNamespace:
    """What a validator factory gets from the daemon; ``k8s`` overrides the ``k8s`` table."""
    own_token = tmp_path / "own-token"
    own_token.write_text("jwtlet-own-token")
    settings = {"api_server_url": cluster.url, "token_file": str(own_token), "ca_file": str(tmp_path / "no-ca"),
                "cluster_issuer": cluster.fake.issuer}
    settings.update(k8s)
    config = types.SimpleNamespace(k8s=types.SimpleNamespace(**settings), dev=dev,
                                   token=types.SimpleNamespace(max_subject_token_age_secs=max_age))
    return types.SimpleNamespace(reactor=clock or reactor, clock=clock or reactor, http_client=cluster.client,
                                 config=config, data_dir=tmp_path)


async def stopping(cluster: Cluster) -> AsyncIterator[Cluster]:
    try:
        yield cluster
    finally:
        await cluster.stop()

