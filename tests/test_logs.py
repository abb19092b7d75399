"""Structured log lines: shape, no tracebacks, and batching per reactor turn."""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from jwtlet.logs import JSONLineObserver, emit, to_json


def test_a_named_event_has_time_level_event_and_its_fields() -> None:
    events: list[dict] = []
    logger = Logger(namespace="t", observer=events.append)
    emit(logger, "token.issued", LogLevel.info, client="c", scopes=["a"], jti="j")
    line = json.loads(to_json(events[0]))
    assert {k: line[k] for k in ("level", "event", "client", "scopes", "jti")} == {
        "level": "info", "event": "token.issued", "client": "c", "scopes": ["a"], "jti": "j"}
    assert line["time"].endswith("Z")


def test_failures_are_named_without_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    events: list[dict] = []
    Logger(namespace="t", observer=events.append).failure("it failed", failure)
    line = to_json(events[0])
    assert '"error_type":"ValueError"' in line and '"error":"boom"' in line
    assert "Traceback" not in line and "File " not in line


class RunningClock(Clock):
    running = True


def test_lines_of_one_reactor_turn_are_written_together(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    clock = RunningClock()
    observer = JSONLineObserver(stream, clock)
    monkeypatch.setattr("jwtlet.logs.isInIOThread", lambda: True)
    for index in range(3):
        observer({"log_level": LogLevel.info, "jwtlet_event": "e", "n": index, "log_time": 0})
    assert stream.getvalue() == "", "held until the end of the turn"
    clock.advance(0)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
    monkeypatch.setattr("jwtlet.logs.isInIOThread", lambda: False)
    observer({"log_level": LogLevel.info, "jwtlet_event": "e", "n": 3, "log_time": 0})
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == 3, "other threads write at once"
