"""
Coming from Tokensmith (migration.md): its ``--workload-kubeconfig`` becomes
``kubeconfig:`` on the ext_authz validator (and the ``k8s`` table), the
target cluster is reached by a kubeconfig too (an EKS/GKE one runs an exec
plugin), and a cached target-cluster token is never served after the
caller's own token has expired.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from k8s_fixtures import MEMORY_URL, Cluster, memory_cluster, start_cluster, stopping
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from jwtlet.extauthz.decide import TokenRequestExchange
from jwtlet.kubernetes.tokenrequest import TargetToken, TokenRequestClient
from jwtlet.metrics import Metrics
from jwtlet.model import Identity
from jwtlet.outbound import TokenFile
from jwtlet.testing.envoy import http_check
from jwtlet.testing.process import DaemonProcess, free_port

AUDIENCE = "https://workload-cluster"
SOURCE_ISSUER = "https://workloads.example"


def caller(clock: Clock, token_lifetime: float) -> Identity:
    """apps/web of the workload cluster, with a token usable for ``token_lifetime`` more seconds."""
    return Identity(username="system:serviceaccount:apps:web", issuer=SOURCE_ISSUER, uid="web-uid",
                    namespace="apps", name="web", expires_at=clock.seconds() + token_lifetime)


def target_exchange(tmp_path: Path, clock: Clock) -> tuple[Cluster, TokenRequestExchange]:
    target = memory_cluster(clock)
    target.fake.add_service_account("apps", "web")
    own = tmp_path / "target-token"
    own.write_text("jwtlet-own-token")
    client = TokenRequestClient(MEMORY_URL, TokenFile(own), target.client, clock, ("https://kubernetes.default.svc",),
                                3600)
    return target, TokenRequestExchange(client, Metrics())


@pytest_twisted.ensureDeferred
async def test_a_cached_target_token_is_never_served_after_the_callers_token_expired(
        tmp_path: Path, clock: Clock) -> None:
    """
    A workload whose token lives 5 more minutes is swapped; the target token
    (an hour) is cached.  Five minutes on, the same account calls with a fresh
    token: the cache entry ended with the first caller's token, so the
    target cluster is asked again rather than handing out what was issued
    against a token that is no longer good.
    """
    target, exchange = target_exchange(tmp_path, clock)
    first = await exchange.exchange(caller(clock, 300), None)
    again = await exchange.exchange(caller(clock, 3600), None)
    assert first.allowed and again.token == first.token  # while the first token lives: cached
    assert target.fake.requests["tokenrequests"] == 1
    clock.advance(301)
    later = await exchange.exchange(caller(clock, 3600), None)
    assert later.allowed and later.token != first.token
    assert target.fake.requests["tokenrequests"] == 2


def test_an_entry_lives_until_the_earlier_of_the_margin_and_the_source_tokens_exp(tmp_path: Path,
                                                                                   clock: Clock) -> None:
    client = TokenRequestClient(MEMORY_URL, TokenFile(tmp_path / "t"), None, clock, (), 3600)  # type: ignore[arg-type]
    issued = TargetToken("t", expires_at=10_000.0)
    assert client.keep_until(issued, None) == 10_000.0 - 360  # a tenth of the lifetime before it expires
    assert client.keep_until(issued, 5_000.0) == 5_000.0
    assert client.keep_until(issued, 20_000.0) == 10_000.0 - 360


# -- a Tokensmith deployment, run on kubeconfigs ------------------------------------------

EXEC_PLUGIN = textwrap.dedent('''\
    import json, os
    info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                      "status": {"token": os.environ["OWN_TOKEN"]}}))
''')


def kubeconfig_for(path: Path, server: str, user: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "main", "context": {"cluster": "c", "user": "u"}}],
    }))
    return str(path)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_tokensmith_setup_runs_on_kubeconfigs_alone(tmp_path: Path) -> None:
    """
    Tokensmith's ``authz --workload-kubeconfig``: the workload cluster by an
    EKS-style kubeconfig (an exec plugin), the target cluster by a
    kubeconfig with a token file; no api_server_url or token_file anywhere.
    """
    async for workload in stopping(await start_cluster()):
        async for target in stopping(await start_cluster()):
            workload.fake.add_service_account("apps", "web")
            target.fake.add_service_account("apps", "web")
            plugin = tmp_path / "eks-get-token.py"
            plugin.write_text(EXEC_PLUGIN)
            workload_kubeconfig = kubeconfig_for(tmp_path / "workload.kubeconfig", workload.url, {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                "args": [str(plugin)], "env": [{"name": "OWN_TOKEN", "value": "jwtlet-own-token"}]}})
            (tmp_path / "target-token").write_text("jwtlet-own-token")
            target_kubeconfig = kubeconfig_for(tmp_path / "target.kubeconfig", target.url,
                                               {"tokenFile": "target-token"})
            config = {
                "issuer": "http://127.0.0.1:8080",
                "storage_backend": {"type": "memory"},
                "k8s": {"kubeconfig": workload_kubeconfig, "cluster_issuer": workload.fake.issuer},
                "validator": {"type": "kubernetes-tokenreview"},
                "token": {"client_audience": AUDIENCE, "audience": "mgmt-api"},
                "signer": {"type": "local-key", "key_file": str(tmp_path / "k.jwk"), "generate": True},
                "ext_authz": {
                    "grpc_endpoint": f"tcp:{free_port()}",
                    "validator": {"type": "kubernetes-tokenreview", "kubeconfig": workload_kubeconfig},
                    "audience": AUDIENCE,
                    "target_cluster": {"kubeconfig": target_kubeconfig},
                },
            }
            path = tmp_path / "jwtlet.yaml"
            path.write_text(yaml.safe_dump(config))
            daemon = DaemonProcess.start(["--config", str(path)], cwd=tmp_path)
            try:
                await deferToThread(daemon.wait_listening)
                token = workload.fake.mint("apps", "web", [AUDIENCE])
                outcome = await http_check(treq, daemon.token_url, "GET", "/api/v1/pods",
                                           {"authorization": f"Bearer {token}"})
                assert outcome.allowed, outcome
                swapped = outcome.upstream_headers["authorization"].split(" ", 1)[1]
                assert target.fake.review(swapped, None)["user"]["username"] == "system:serviceaccount:apps:web"
            finally:
                daemon.stop()
