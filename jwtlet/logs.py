"""
Structured logs: one JSON object per line with ``time``, ``level``, ``event``
and the event's fields, twistd's own events included.

twistd starts its log observer after ``makeService``; the plugin's options
point twistd's ``--logger`` at :func:`observer` (unless the user named one),
and ``makeService`` records the format, level and destination chosen by the
config with :func:`configure`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, Mapping, Optional

import attrs
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

OBSERVER_NAME = "jwtlet.logs.observer"

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


@attrs.define
class LogSettings:
    format: str = "json"
    level: str = "info"
    logfile: Optional[str] = None


_settings = LogSettings()


def configure(settings: LogSettings) -> None:
    """Record how the observer that twistd starts next should behave."""
    global _settings
    _settings = settings


def emit(logger: Logger, event: str, level: LogLevel = LogLevel.info, **fields: Any) -> None:
    """Log a named event (``token.issued``, ``mapping.created``) with its fields."""
    logger.emit(level, event, jwtlet_event=event, **fields)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def to_json(event: Mapping[str, Any]) -> str:
    """
    One log line.  Failures are named by type and message only: tracebacks
    can quote locals such as tokens, so they are not written.
    """
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": level.name,
        "event": event.get("jwtlet_event") or event.get("log_namespace") or "log",
    }
    message = formatEvent(dict(event)) if "jwtlet_event" not in event else None
    if message:
        record["message"] = message
    failure = event.get("log_failure")
    if failure is not None:
        record["error_type"] = getattr(failure.type, "__name__", str(failure.type))
        record["error"] = str(failure.value)[:500]
    for key, value in event.items():
        if key.startswith("log_") or key in ("jwtlet_event", "format", "message", "time", "level", "event"):
            continue
        if key in ("system", "isError", "why", "failure"):
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
@attrs.define
class JSONLineObserver:
    """
    Writes one JSON line per event.  With a ``reactor``, lines logged in the
    reactor thread are written together once per reactor turn (one write and
    flush for all the lines of a busy turn instead of one per line); lines
    from other threads, and every line once the reactor stops, go out at once.
    """

    stream: IO[str]
    reactor: Any = None
    _pending: list[str] = attrs.field(factory=list)
    _scheduled: bool = False

    def __call__(self, event: Mapping[str, Any]) -> None:
        line = to_json(event) + "\n"
        if self.reactor is None or not self.reactor.running or not isInIOThread():
            self.stream.write(line)
            self.stream.flush()
            return
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if lines:
            self.stream.write("".join(lines))
            self.stream.flush()


def _stream(logfile: Optional[str]) -> IO[str]:
    if not logfile or logfile == "-":
        return sys.stdout
    return LogFile.fromFullPath(logfile)  # type: ignore[return-value]


def observer() -> ILogObserver:
    """The observer twistd's ``--logger`` names: format and level from config."""
    settings = _settings
    stream = _stream(settings.logfile)
    inner: ILogObserver
    if settings.format == "json":
        from twisted.internet import reactor

        lines = JSONLineObserver(stream, reactor)
        reactor.addSystemEventTrigger("after", "shutdown", lines.flush)
        inner = lines
    else:
        inner = textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS.get(settings.level.lower(), LogLevel.info))
    return FilteringLogObserver(inner, [predicate])
