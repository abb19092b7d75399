"""Helpers of the tests that run the daemon as a process and talk to it over loopback."""

from __future__ import annotations

from typing import Any

import treq


async def post_json(url: str, body: Any, token: str) -> int:
    """POST ``body`` as JSON with a bearer token; the status (the body is read, so the connection can be reused)."""
    response = await treq.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    await response.content()
    return int(response.code)
