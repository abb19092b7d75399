"""
The ``time`` of a log line: RFC 3339 UTC with milliseconds, from the event's
own ``log_time``.  The text of the whole second is remembered between lines
(it was a visible share of each exchange's audit line), so these tests check
that a line never carries another second's text.
"""

from __future__ import annotations

import json

import pytest
from twisted.logger import LogLevel

from jwtlet.logs import to_json, to_text


def line_time(when: float) -> str:
    return str(json.loads(to_json({"log_level": LogLevel.info, "jwtlet_event": "e", "log_time": when}))["time"])


def test_the_time_is_the_events_own_in_utc_with_milliseconds() -> None:
    assert line_time(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert line_time(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"
    assert line_time(0) == "1970-01-01T00:00:00.000Z"


def test_lines_of_other_seconds_never_reuse_a_remembered_second() -> None:
    """Seconds in any order, more of them than are remembered, each back again: every line says its own."""
    start = 1_700_000_000  # 2023-11-14T22:13:20Z
    expected = {0: "2023-11-14T22:13:20", 1: "2023-11-14T22:13:21", 59: "2023-11-14T22:14:19",
                3600: "2023-11-14T23:13:20", 86400: "2023-11-15T22:13:20", 2: "2023-11-14T22:13:22",
                3: "2023-11-14T22:13:23", 4: "2023-11-14T22:13:24"}
    for offset in (0, 1, 0, 59, 3600, 86400, 2, 3, 4, 1, 0):
        assert line_time(start + offset + 0.25) == f"{expected[offset]}.250Z"


def test_an_event_without_a_time_is_stamped_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jwtlet.logs.time.time", lambda: 1_700_000_000.125)
    line = json.loads(to_json({"log_level": LogLevel.info, "jwtlet_event": "e"}))
    assert line["time"] == "2023-11-14T22:13:20.125Z"


def test_the_text_line_starts_with_the_same_time() -> None:
    event = {"log_level": LogLevel.info, "jwtlet_event": "token.issued", "log_time": 1_700_000_000.5, "client": "c"}
    assert to_text(event) == "2023-11-14T22:13:20.500Z info token.issued client=c"
