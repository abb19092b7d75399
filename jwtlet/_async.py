"""Let providers answer with a Deferred, a coroutine, another awaitable or a plain value."""

from __future__ import annotations

import inspect
from typing import Any, Awaitable

from twisted.internet.defer import Deferred, ensureDeferred, succeed


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def as_deferred(result: Any) -> Deferred[Any]:
    """
    Wrap whatever a provider method returned in a ``Deferred``.

    Any awaitable is driven on the reactor like a coroutine: one that waits on
    Deferreds works, and one that needs an event loop the reactor does not
    run (an asyncio future) fails at once with the error it raises there,
    instead of waiting forever for a loop that never turns.
    """
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    if inspect.isawaitable(result):
        return ensureDeferred(_awaited(result))
    return succeed(result)
