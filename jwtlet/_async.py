"""Let providers answer with a Deferred, a coroutine or a plain value."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed


def as_deferred(result: Any) -> Deferred[Any]:
    """Wrap whatever a provider method returned in a ``Deferred``."""
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    if inspect.isawaitable(result):
        return Deferred.fromFuture(asyncio.ensure_future(result))
    return succeed(result)
