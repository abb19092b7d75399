"""Structured log lines, JSON and text: shape, no tracebacks, and batching per reactor turn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from jwtlet import logs
from jwtlet.logs import LineObserver, LogSettings, emit, observer, to_json, to_text


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
    observer = LineObserver(stream, clock)
    monkeypatch.setattr("jwtlet.logs.isInIOThread", lambda: True)
    for index in range(3):
        observer({"log_level": LogLevel.info, "jwtlet_event": "e", "n": index, "log_time": 0})
    assert stream.getvalue() == "", "held until the end of the turn"
    clock.advance(0)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
    monkeypatch.setattr("jwtlet.logs.isInIOThread", lambda: False)
    observer({"log_level": LogLevel.info, "jwtlet_event": "e", "n": 3, "log_time": 0})
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == 3, "other threads write at once"


def audit_event(**fields: object) -> dict:
    events: list[dict] = []
    emit(Logger(namespace="jwtlet.management", observer=events.append), "mapping.created", LogLevel.info,
         **fields)
    return events[0]


def test_a_text_line_carries_the_same_fields_as_the_json_line() -> None:
    event = audit_event(actor="system:serviceaccount:platform:admin", clientIdentifier="c", outcome="success",
                        scopes=["read", "write"])
    line = to_text(event)
    as_json = json.loads(to_json(event))
    assert line == (f"{as_json['time']} info mapping.created actor=system:serviceaccount:platform:admin "
                    'clientIdentifier=c outcome=success scopes=["read","write"]')


def test_text_values_with_spaces_or_equals_signs_are_quoted() -> None:
    line = to_text(audit_event(actor="a b", clientIdentifier="x=y", outcome="refused", error="",
                               keyId='say "hi"', scopes=["has space"], tier=3))
    assert line.split(" ", 3)[3] == (
        'actor="a b" clientIdentifier="x=y" outcome=refused error="" keyId="say \\"hi\\"" '
        'scopes="[\\"has space\\"]" tier=3')


def test_a_value_with_a_line_break_cannot_forge_a_second_text_line() -> None:
    """An attacker-chosen value holding a newline (or U+2028) stays on its event's one line."""
    forged = "x\n2026-01-01T00:00:00.000Z info mapping.deleted actor=admin outcome=success"
    line = to_text(audit_event(actor="attacker", clientIdentifier=forged, other="a\u2028b", outcome="refused"))
    assert "\n" not in line and "\u2028" not in line
    assert line.splitlines() == [line]
    assert 'clientIdentifier="x\\n2026' in line


def test_events_of_twisted_itself_keep_their_message_in_text() -> None:
    events: list[dict] = []
    Logger(namespace="twisted.web", observer=events.append).info("Starting factory {name}", name="f")
    assert to_text(events[0]).split(" ", 1)[1] == 'info twisted.web message="Starting factory f" name=f'


class Reactor(RunningClock):
    """Enough of a reactor for the observer: it turns and has shutdown triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, object]] = []

    def addSystemEventTrigger(self, phase: str, event: str, callable: object) -> None:  # noqa: N802
        self.triggers.append((phase, event, callable))


def test_logging_format_text_writes_key_value_audit_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jwtlet.logs.isInIOThread", lambda: False)
    observe = observer(LogSettings(format="text", logfile=str(tmp_path / "log")), Reactor())
    observe(audit_event(actor="admin", clientIdentifier="c", outcome="error", error="temporarily_unavailable"))
    written = (tmp_path / "log").read_text()
    assert written.endswith(" info mapping.created actor=admin clientIdentifier=c outcome=error "
                            "error=temporarily_unavailable\n")


def test_two_daemons_in_one_process_log_with_their_own_settings(tmp_path: Path) -> None:
    """Settings travel with each application: installing one never changes another's format or file."""
    applications = [Componentized(), Componentized()]
    stopped = Reactor()
    stopped.running = False  # lines are written at once
    logs.install(applications[0], LogSettings(format="json", logfile=str(tmp_path / "a.log")), stopped)
    logs.install(applications[1], LogSettings(format="text", logfile=str(tmp_path / "b.log")), stopped)
    for application in applications:
        application.getComponent(ILogObserver)(audit_event(actor="admin", clientIdentifier="c", outcome="success"))
    assert json.loads((tmp_path / "a.log").read_text())["actor"] == "admin"
    assert " mapping.created actor=admin " in (tmp_path / "b.log").read_text()


def test_the_configured_level_drops_less_severe_events(tmp_path: Path) -> None:
    stopped = Reactor()
    stopped.running = False  # lines are written at once
    observe = observer(LogSettings(level="warn", logfile=str(tmp_path / "log")), stopped)
    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
        observe({"log_level": level, "log_namespace": "jwtlet", "jwtlet_event": level.name, "log_time": 0})
    observe({"log_namespace": "jwtlet", "jwtlet_event": "no level", "log_time": 0})
    written = [json.loads(line)["event"] for line in (tmp_path / "log").read_text().splitlines()]
    assert written == ["warn", "error"]
