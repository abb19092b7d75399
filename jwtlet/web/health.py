"""
``GET /health`` and ``GET /ready`` on both ports: liveness, and the state of
every provider that can tell it, each asked for a bounded time.
"""

from __future__ import annotations

from typing import Mapping, Protocol, TypeVar

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from jwtlet.interfaces import DependencyUnavailable
from jwtlet.providers import Adapted
from jwtlet.web.responses import json_response, retry_after

log = Logger(namespace="jwtlet.web")

T = TypeVar("T")

READY_CHECK_TIMEOUT_SECS = 0.8
OK = "ok"
UNAVAILABLE = "unavailable"


@attrs.define
class Readiness:
    """
    Asks every provider that can tell (:class:`IReadiness`), named by the role it
    plays (``store``, ``signer``, ``validator``), all at once and each for at
    most ``timeout`` seconds, so that ``/ready`` answers within a second
    whatever a dependency does.  Each answer is only ``ok`` or
    ``unavailable``: ``/ready`` needs no auth, so why a dependency is down
    (error text, URLs, paths) goes to the log, never into the answer.
    """

    providers: Mapping[str, Adapted]
    clock: IReactorTime
    timeout: float = READY_CHECK_TIMEOUT_SECS

    async def check(self) -> dict[str, str]:
        # Every check starts before the first is awaited: they run side by side.
        started = {name: ensureDeferred(self._check(name, provider))
                   for name, provider in sorted(self.providers.items())}
        return {name: await state for name, state in started.items()}

    async def _check(self, name: str, provider: Adapted) -> str:
        if not provider.checks_readiness:
            return OK
        try:
            await within(provider.check_ready(), self.timeout, self.clock)
        except TimeoutError:
            log.warn("readiness check of {name} did not answer within {secs}s", name=name, secs=self.timeout)
            return UNAVAILABLE
        except DependencyUnavailable as error:
            log.warn("{name} is not ready: {reason}", name=name, reason=str(error))
            return UNAVAILABLE
        except CancelledError:
            # The probe went away (nobody reads this answer), or the provider
            # cancelled its own call: never let it become an empty 200.
            log.info("readiness check of {name} was cancelled", name=name)
            return UNAVAILABLE
        except Exception:
            log.failure("readiness check of {name} failed", name=name)
            return UNAVAILABLE
        return OK


def within(answer: Deferred[T], timeout: float, clock: IReactorTime) -> Deferred[T]:
    """
    The outcome of ``answer``, or :class:`TimeoutError` once ``timeout``
    seconds have passed.  Unlike ``Deferred.addTimeout`` this does not wait
    for ``answer`` to give in: a coroutine that catches its cancellation and
    goes on waiting still times out on time.  A late outcome is dropped.
    """

    def cancel(_: Deferred[T]) -> None:
        if timer.active():
            timer.cancel()
        answer.cancel()

    bounded: Deferred[T] = Deferred(cancel)

    def settle(result: T | Failure) -> None:
        if timer.active():
            timer.cancel()
        if bounded.called:
            return
        if isinstance(result, Failure):
            bounded.errback(result)
        else:
            bounded.callback(result)

    def expire() -> None:
        bounded.errback(TimeoutError(f"no answer within {timeout}s"))
        answer.cancel()

    timer = clock.callLater(timeout, expire)
    answer.addBoth(settle)
    return bounded


class HasReadiness(Protocol):
    """An API class whose instances know their :class:`Readiness`."""

    readiness: Readiness


def add_health_routes(app: Klein) -> None:
    """
    ``GET /health`` (liveness) and ``GET /ready`` (dependencies) on the class
    attribute ``app`` of an API class whose instances have ``readiness``.
    """

    @app.route("/health", methods=["GET"])
    def health(self: object, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"OK"

    @app.route("/ready", methods=["GET"])
    async def ready(self: HasReadiness, request: IRequest) -> bytes:
        checks = await self.readiness.check()
        if all(state == OK for state in checks.values()):
            return json_response(request, {"status": "ready"})
        return json_response(
            request, {"status": "unavailable", "checks": checks}, 503, retry_after(5)
        )
