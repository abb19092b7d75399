"""
The fake Kubernetes API server for validator tests: in memory for unit tests
(no socket, no global reactor), on loopback for end-to-end tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

import attrs
from treq.client import HTTPClient
from twisted.internet import reactor

from jwtlet.config.schema import Config, K8sConfig, PluginSection, TokenConfig
from jwtlet.interfaces import PluginContext
from jwtlet.metrics import Metrics
from jwtlet.outbound import build_http_client, close_http_client
from jwtlet.testing.kubernetes import FakeKubernetes
from jwtlet.testing.loopback import LoopbackServer, serve
from jwtlet.testing.memory import MemoryNetwork, MemoryServer

CLIENT_AUDIENCE = "jwtlet-test"
#: Where the in-memory API server answers (and its issuer): https, as in a cluster.
MEMORY_URL = "https://kubernetes.test"
OWN_TOKEN = "jwtlet-own-token"


@attrs.define
class Cluster:
    """A fake API server, served somewhere, with a client that reaches it."""

    fake: FakeKubernetes
    server: Union[LoopbackServer, MemoryServer]
    client: HTTPClient

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        await close_http_client(self.client)
        await self.server.stop()


async def start_cluster(clock: Any = None) -> Cluster:
    """The fake on a loopback port, over real HTTP: for end-to-end tests and the daemon."""
    fake = FakeKubernetes(clock=clock)
    server = await serve(reactor, fake.resource())
    fake.url = server.url
    fake.issuer = server.url
    return Cluster(fake, server, build_http_client(reactor))


def memory_cluster(clock: Any) -> Cluster:
    """The fake in memory at :data:`MEMORY_URL`; requests to other origins fail as an unknown host does."""
    fake = FakeKubernetes(clock=clock, issuer=MEMORY_URL, url=MEMORY_URL)
    network = MemoryNetwork()
    server = network.serve(MEMORY_URL, fake.resource())
    return Cluster(fake, server, network.client())


def own_token_file(tmp_path: Path) -> Path:
    """jwtlet's own service-account token, as the API server's caller (the fake accepts it)."""
    path = tmp_path / "own-token"
    path.write_text(OWN_TOKEN)
    return path


def jwtlet_config(validator: str, k8s: K8sConfig = K8sConfig(), dev: bool = False, max_age: int = 86400) -> Config:
    """A whole configuration, as the daemon hands it to plugins."""
    return Config(
        issuer="https://jwtlet.test",
        token=TokenConfig(client_audience=CLIENT_AUDIENCE, audience="downstream",
                          max_subject_token_age_secs=max_age),
        storage_backend=PluginSection("memory"),
        validator=PluginSection(validator),
        signer=PluginSection("local-key"),
        k8s=k8s,
        dev=dev,
    )


def k8s_config(tmp_path: Path, cluster: Cluster, dev: bool = False, max_age: int = 86400, **k8s: Any) -> Config:
    """A configuration whose ``k8s`` table points at ``cluster``; ``k8s`` overrides that table."""
    settings = {"api_server_url": cluster.url, "token_file": str(own_token_file(tmp_path)),
                "ca_file": str(tmp_path / "no-ca"), "cluster_issuer": cluster.fake.issuer}
    settings.update(k8s)
    return jwtlet_config("kubernetes-tokenreview", K8sConfig(**settings), dev, max_age)


def plugin_context(tmp_path: Path, cluster: Cluster, clock: Any = None, dev: bool = False, max_age: int = 86400,
                   http_client: Optional[HTTPClient] = None, metrics: Optional[Metrics] = None,
                   **k8s: Any) -> PluginContext:
    """
    What a validator factory gets from the daemon: ``cluster``'s client unless
    ``http_client`` is given; ``k8s`` overrides the ``k8s`` table.
    """
    return PluginContext(reactor=clock or reactor, clock=clock or reactor, http_client=http_client or cluster.client,
                         config=k8s_config(tmp_path, cluster, dev, max_age, **k8s), data_dir=tmp_path,
                         metrics=metrics)


async def stopping(cluster: Cluster) -> AsyncIterator[Cluster]:
    try:
        yield cluster
    finally:
        await cluster.stop()
