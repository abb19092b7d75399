"""
``jwtlet.testing`` itself: its fakes need nothing but what ``pip install
jwtlet`` installs, and the in-memory network behaves like one (requests
arrive whole, a stopped server refuses, an unknown host is unknown).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from jwtlet.interfaces import DependencyUnavailable, IMappingStore, IReadiness
from jwtlet.plugins.memory_store import MemoryStore
from jwtlet.testing.fakes import Interruptible
from jwtlet.testing.kubernetes import FakeKubernetes
from jwtlet.testing.memory import MemoryNetwork

ROOT = Path(__file__).resolve().parent.parent
URL = "https://kubernetes.test"


def extra_modules() -> set[str]:
    """The top-level modules of every distribution in setup.cfg's ``test`` extra."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    normalise = re.compile(r"[-_.]+")
    wanted = {
        normalise.sub("-", match.group(0)).lower()
        for line in parser["options.extras_require"]["test"].split()
        if (match := re.match(r"[A-Za-z0-9_.-]+", line))
    } - {"jwtlet"}  # `jwtlet[otel]`: the test extra pulls in another extra of jwtlet itself

    return {
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if {normalise.sub("-", name).lower() for name in distributions} & wanted
    }


IMPORT_ALL_BUT_THE_EXTRA = """
import importlib, json, pkgutil, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # "import name" now fails, as if not installed
import jwtlet.testing
imported = []
for module in pkgutil.walk_packages(jwtlet.testing.__path__, "jwtlet.testing."):
    if not module.name.startswith(sys.argv[2]):
        importlib.import_module(module.name)
        imported.append(module.name)
print(json.dumps(imported))
"""


def import_without_the_test_extra(skip: str) -> subprocess.CompletedProcess[str]:
    """Import every module of ``jwtlet.testing`` but those under ``skip``, with the test extra unimportable."""
    blocked = json.dumps(sorted(extra_modules()))
    return subprocess.run([sys.executable, "-c", IMPORT_ALL_BUT_THE_EXTRA, blocked, skip],  # noqa: S603
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_fakes_import_without_the_test_extra() -> None:
    """
    A user who ran ``pip install jwtlet`` (no test extra: no pytest, PyJWT,
    joserfc...) imports every module of ``jwtlet.testing`` but the
    conformance suites.
    """
    assert {"pytest", "_pytest", "jwt", "joserfc", "hypothesis"} <= extra_modules()
    result = import_without_the_test_extra(skip="jwtlet.testing.conformance")
    assert result.returncode == 0, result.stderr
    fakes = {"fakes", "kubernetes", "memory", "envoy", "loopback", "process", "postgres"}
    assert {f"jwtlet.testing.{name}" for name in fakes} <= set(json.loads(result.stdout))


def test_the_conformance_suites_are_the_part_that_needs_the_extra() -> None:
    """The blocking is real: without the test extra, the conformance suites do not import."""
    result = import_without_the_test_extra(skip="nothing skipped")
    assert result.returncode != 0
    assert "jwtlet/testing/conformance/" in result.stderr


# -- the in-memory network ---------------------------------------------------------------------------


def result_of(deferred: Any) -> Any:
    """What a Deferred fired with, asserting it already has (in memory, nothing waits)."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the request did not complete in memory"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def review(client: Any, token: str, bearer: str = "jwtlet-own-token") -> tuple[int, Any]:
    response = result_of(client.post(
        f"{URL}/apis/authentication.k8s.io/v1/tokenreviews",
        data=json.dumps({"spec": {"token": token, "audiences": ["aud"]}}).encode(),
        headers={"Authorization": [f"Bearer {bearer}"], "Content-Type": ["application/json"]},
    ))
    return response.code, json.loads(result_of(response.content()))


def test_a_request_reaches_the_fake_and_returns_without_a_reactor() -> None:
    """A TokenReview POST (headers and body) is answered at once, by the fake's real HTTP handling."""
    fake = FakeKubernetes(clock=Clock(), issuer=URL, url=URL)
    fake.add_service_account("ns", "app")
    network = MemoryNetwork()
    network.serve(URL, fake.resource())
    code, body = review(network.client(), fake.mint("ns", "app", ["aud"]))
    assert code == 201 and body["status"]["user"]["username"] == "system:serviceaccount:ns:app"
    assert review(network.client(), "x", bearer="not-ours")[0] == 401
    assert fake.requests["tokenreviews"] == 2


def test_a_stopped_server_refuses_and_an_unknown_host_is_unknown() -> None:
    network = MemoryNetwork()
    server = network.serve(URL, FakeKubernetes(clock=Clock()).resource())
    client = network.client()
    result_of(server.stop())
    with pytest.raises(ConnectionRefusedError):
        result_of(client.get(f"{URL}/openid/v1/jwks"))
    server.start()
    assert result_of(client.get(f"{URL}/openid/v1/jwks")).code == 401
    for elsewhere in ("https://attacker.example/jwks", "http://kubernetes.test/jwks", "https://kubernetes.test:8443/"):
        with pytest.raises(DNSLookupError):
            result_of(client.get(elsewhere))


def test_unknown_origins_go_to_the_fallback_agent() -> None:
    asked: list[bytes] = []
    answer: Deferred[Any] = Deferred()

    class Recording:
        def request(self, method: bytes, uri: bytes, headers: Optional[Any] = None,
                    bodyProducer: Optional[Any] = None) -> Deferred[Any]:
            asked.append(uri)
            return answer

    network = MemoryNetwork(fallback=Recording())  # type: ignore[arg-type]
    network.serve(URL, FakeKubernetes(clock=Clock()).resource())
    assert network.request(b"GET", b"http://127.0.0.1:1234/x") is answer
    assert result_of(network.request(b"GET", f"{URL}/openid/v1/jwks".encode())).code == 401
    assert asked == [b"http://127.0.0.1:1234/x"]


def test_a_late_answer_arrives_after_flush() -> None:
    """A resource that answers later (NOT_DONE_YET) is delivered by ``flush()`` once it has."""
    clock = Clock()

    class Later(Resource):
        isLeaf = True

        def render_GET(self, request: IRequest) -> Any:
            clock.callLater(5, lambda: (request.write(b"done"), request.finish()))
            return NOT_DONE_YET

    network = MemoryNetwork()
    network.serve(URL, Later())
    outcome: list[Any] = []
    network.client().get(URL).addCallback(outcome.append)
    assert outcome == []
    clock.advance(5)
    network.flush()
    assert [response.code for response in outcome] == [200]


# -- providers taken down ---------------------------------------------------------------------------


def test_an_interrupted_provider_fails_every_call_until_it_is_back() -> None:
    store = Interruptible(MemoryStore(clock=Clock()))
    assert result_of(store.list_scopes()) == []
    store.down = True
    with pytest.raises(DependencyUnavailable):
        result_of(store.list_scopes())
    store.down = False
    assert result_of(store.list_scopes()) == []


def test_an_interrupted_provider_still_says_what_it_provides() -> None:
    """Only methods are interrupted: interface checks answer for the wrapped provider, down or not."""
    store = Interruptible(MemoryStore(clock=Clock()))
    store.down = True
    assert IMappingStore.providedBy(store) is True
    assert IReadiness.providedBy(store) is False
