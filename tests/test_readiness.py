"""
``/ready`` answers within a second whatever a dependency does, and names
each dependency and its state only: a hung database or Vault makes it 503
on time, and no error text, URL or path ever reaches its (unauthenticated)
body.  ``/health`` never waits on a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from apps import Apps, make_apps
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred, fail
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from jwtlet.interfaces import DependencyUnavailable, IReadiness
from jwtlet.providers import adapt
from jwtlet.web.health import READY_CHECK_TIMEOUT_SECS, Readiness, within

URL = "http://jwtlet.test"
SECRET_URL = "postgresql://jwtlet:hunter2@db.internal:5432/jwtlet"


@implementer(IReadiness)
class Dependency:
    """A provider whose readiness check does whatever ``answer`` does."""

    def __init__(self, answer: Callable[[], Any]):
        self.answer = answer

    def check_ready(self) -> Any:
        return self.answer()


def ok() -> None:
    return None


def hangs() -> Deferred[None]:
    return Deferred()


async def hangs_and_ignores_cancellation() -> None:
    try:
        await Deferred()
    except CancelledError:
        await Deferred()


def database_down() -> Deferred[None]:
    return fail(DependencyUnavailable(f"cannot connect to {SECRET_URL}"))


def raises_at_once() -> None:
    raise PermissionError("/etc/jwtlet/vault-token: permission denied")


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    return make_apps(tmp_path)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line written while the test runs, formatted, with the error it carries."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        lines.append(formatEvent(event) + (f" {failure.value!r}" if failure is not None else ""))

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    yield lines
    globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]


def depend_on(apps: Apps, **answers: Callable[[], Any]) -> None:
    """Both ports' readiness asks these dependencies, on the test's clock."""
    providers = {name: adapt(name, Dependency(answers.get(name, ok))) for name in ("signer", "store", "validator")}
    readiness = Readiness(providers, apps.clock)
    apps.token_api.readiness = readiness
    apps.management_api.readiness = readiness


def probe(stub: Any, path: str = "/ready") -> Deferred[Any]:
    """Start a request and return the Deferred of (status, body)."""

    async def request() -> tuple[int, bytes]:
        response = await stub.get(URL + path)
        return response.code, await response.content()

    started = ensureDeferred(request())
    stub.flush()
    return started


def answer(stub: Any, started: Deferred[Any]) -> tuple[int, Any]:
    stub.flush()
    results: list[Any] = []
    started.addBoth(results.append)
    assert results, "no answer yet"
    code, body = results[0]
    return code, body


def test_a_hung_dependency_makes_ready_503_once_its_check_times_out(apps: Apps) -> None:
    """The database stops answering: /ready must not wait with it (a kubelet probe times out at 1 s)."""
    depend_on(apps, store=hangs)
    started = probe(apps.token)
    apps.clock.advance(READY_CHECK_TIMEOUT_SECS - 0.01)
    apps.token.flush()
    assert not started.called, "still within the check's time"
    apps.clock.advance(0.01)
    code, body = answer(apps.token, started)
    assert READY_CHECK_TIMEOUT_SECS < 1.0
    assert code == 503
    assert json.loads(body) == {"status": "unavailable",
                                "checks": {"signer": "ok", "store": "unavailable", "validator": "ok"}}


def test_hung_dependencies_are_checked_side_by_side(apps: Apps) -> None:
    """Every dependency hangs: the answer still comes after one timeout, not one per dependency."""
    depend_on(apps, signer=hangs, store=hangs, validator=hangs_and_ignores_cancellation)
    started = probe(apps.management)
    apps.clock.advance(READY_CHECK_TIMEOUT_SECS)
    code, body = answer(apps.management, started)
    assert code == 503
    assert json.loads(body)["checks"] == {"signer": "unavailable", "store": "unavailable",
                                          "validator": "unavailable"}


def test_ready_names_states_never_reasons(apps: Apps, logged: list[str]) -> None:
    """
    A store failing with its connection URL (password included) and a signer
    failing with a file path: /ready needs no auth, so neither appears in it;
    the reasons go to the log for the operator.
    """
    depend_on(apps, store=database_down, signer=raises_at_once)
    for stub in (apps.token, apps.management):
        code, body = answer(stub, probe(stub))
        assert code == 503
        assert json.loads(body) == {"status": "unavailable",
                                    "checks": {"signer": "unavailable", "store": "unavailable", "validator": "ok"}}
        for secret in ("hunter2", "postgresql", "db.internal", "/etc/jwtlet", "permission", "Error"):
            assert secret.encode() not in body, secret
    text = "\n".join(logged)
    assert SECRET_URL in text, "the reason is in the log"
    assert "vault-token" in text


def test_all_ready_is_200(apps: Apps) -> None:
    depend_on(apps)
    code, body = answer(apps.token, probe(apps.token))
    assert (code, json.loads(body)) == (200, {"status": "ready"})


def test_health_never_waits_on_a_dependency(apps: Apps) -> None:
    depend_on(apps, signer=hangs, store=hangs, validator=hangs)
    for stub in (apps.token, apps.management):
        assert answer(stub, probe(stub, "/health")) == (200, b"OK"), "answered without the clock moving"


def test_a_check_answering_after_its_timeout_changes_nothing() -> None:
    clock = Clock()
    release: Deferred[None] = Deferred()

    async def stubborn() -> None:
        try:
            await Deferred()
        except CancelledError:
            await release

    late = ensureDeferred(stubborn())
    outcomes: list[Any] = []
    within(late, 0.8, clock).addBoth(outcomes.append)
    clock.advance(0.8)
    assert len(outcomes) == 1 and outcomes[0].check(TimeoutError)
    release.callback(None)
    assert late.called and len(outcomes) == 1, "the late answer is dropped"


def test_a_probe_that_goes_away_cancels_the_check() -> None:
    clock = Clock()
    cancelled: list[Deferred[None]] = []
    check: Deferred[None] = Deferred(cancelled.append)
    outcomes: list[Any] = []
    bounded = within(check, 0.8, clock)
    bounded.addBoth(outcomes.append)
    bounded.cancel()
    assert cancelled == [check]
    assert outcomes[0].check(CancelledError)
    assert not clock.getDelayedCalls(), "no timer left behind"


def test_a_check_that_cancels_itself_is_unavailable_not_an_empty_answer(apps: Apps) -> None:
    """A provider whose own client call got cancelled: /ready still answers 503 with its JSON body."""
    depend_on(apps, signer=lambda: fail(CancelledError()))
    code, body = answer(apps.token, probe(apps.token))
    assert code == 503
    assert json.loads(body)["checks"]["signer"] == "unavailable"
