"""
Structured logs: one line per event with ``time``, ``level``, ``event`` and
the event's fields, twistd's own events included: a JSON object
(``logging.format: json``) or ``time level event key=value ...`` (``text``),
the same fields either way.

twistd starts its log observer after ``makeService``: :func:`install` makes
the observer for the config's settings the application's ``ILogObserver``,
which twistd uses unless the user named a ``--logger``.  The settings travel
as an argument, never through module state, so two daemons (or tests) in one
process cannot see each other's.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import IO, Callable, Mapping, Optional, Protocol, cast

import attrs
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from jwtlet import jsonout
from jwtlet.model import JSONObject, JSONValue

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


# -- RUST_LOG (the Rust jwtlet's tracing EnvFilter) ------------------------------

#: EnvFilter's level names and digits as ours; ``trace`` has no Twisted level
#: of its own and ``off`` none at all: the nearest ones.
_RUST_LEVELS = {
    "off": "critical", "0": "critical",
    "error": "error", "1": "error",
    "warn": "warn", "2": "warn",
    "info": "info", "3": "info",
    "debug": "debug", "4": "debug",
    "trace": "debug", "5": "debug",
}
_VERBOSITY = ("critical", "error", "warn", "info", "debug")
#: The Rust jwtlet's crates (``jwtlet_server``, ``jwtlet_core``, ...): EnvFilter
#: matches a directive's target as a prefix of the event's.
_RUST_TARGET = "jwtlet"


def rust_log_level(value: Optional[str]) -> Optional[str]:
    """
    The level ``RUST_LOG`` asks of jwtlet, or ``None`` (unset, or not a filter
    EnvFilter accepts, on which the Rust jwtlet also fell back to ``info``).

    jwtlet has one logger, so of EnvFilter's directives only two kinds
    matter: a bare level (the default) and ``TARGET=LEVEL`` where TARGET
    names jwtlet (``jwtlet=debug``, ``jwtlet_server=trace``), which wins over
    the default, the most verbose of them when there are several.  Directives
    for other targets (``sqlx=warn``) are about libraries jwtlet does not have.
    """
    if not value or not value.strip():
        return None
    default: Optional[str] = None
    ours: list[str] = []
    for directive in (part.strip() for part in value.split(",")):
        if not directive:
            continue
        target, separator, level_name = directive.rpartition("=")
        level = _RUST_LEVELS.get(level_name.strip().lower())
        if not separator:
            # A directive without '=' is a level, or a target enabled at every level.
            if level is None:
                target, level = directive, "debug"
            else:
                default = level
                continue
        if level is None:
            return None
        if target.split("[", 1)[0].split("::", 1)[0].strip().startswith(_RUST_TARGET):
            ours.append(level)
    if ours:
        return max(ours, key=_VERBOSITY.index)
    return default


class ReactorLoop(Protocol):
    """What :class:`LineObserver` asks of the reactor: whether it turns, and a later call."""

    @property
    def running(self) -> bool: ...

    def callLater(self, delay: float, callable: Callable[[], object]) -> object: ...  # noqa: N802 - Twisted's name

    def addSystemEventTrigger(  # noqa: N802 - Twisted's name
        self, phase: str, eventType: str, callable: Callable[[], object]  # noqa: N803
    ) -> object: ...


@attrs.define
class LogSettings:
    format: str = "json"
    level: str = "info"
    logfile: Optional[str] = None


def emit(logger: Logger, event: str, level: LogLevel = LogLevel.info, **fields: JSONValue) -> None:
    """Log a named event (``token.issued``, ``mapping.created``) with its fields."""
    logger.emit(level, event, jwtlet_event=event, **fields)


def _plain(value: object) -> JSONValue:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


#: Keys of an event that are Twisted's bookkeeping, or that a line sets itself.
_NOT_FIELDS = frozenset({
    "jwtlet_event", "format", "message", "time", "level", "event", "system", "isError", "why", "failure",
})


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    # Every line of a second shares this text; formatting it per line was a
    # visible part of each exchange's audit line.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(when: float) -> str:
    """RFC 3339 UTC with milliseconds."""
    second, fraction = divmod(when, 1)
    return f"{_utc_second(int(second))}.{int(fraction * 1000):03d}Z"


def _record(event: LogEvent) -> JSONObject:
    """
    The fields of one log line.  Failures are named by type and message
    only: tracebacks can quote locals such as tokens, so they are not written.
    """
    level = event.get("log_level", LogLevel.info)
    when = event.get("log_time")
    record: JSONObject = {
        "time": _timestamp(time.time() if when is None else when),
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
        if key in _NOT_FIELDS or key.startswith("log_"):
            continue
        record[key] = value if type(value) is str else _plain(value)
    return record


def to_json(event: LogEvent) -> str:
    """One log line as a JSON object."""
    return jsonout.text(_record(event))


def _text_value(value: JSONValue) -> str:
    """
    A value as ``key=value`` shows it: bare when that is unambiguous, else
    quoted as a JSON string, which also escapes line breaks and other
    control characters so that a value can never start a forged line.
    Lists and objects are compact JSON (their quotes cannot be mistaken for
    the start of a quoted value).
    """
    if isinstance(value, str):
        text, awkward = value, '="'
    else:
        text, awkward = json.dumps(value, ensure_ascii=False, separators=(",", ":")), "="
    if text and text.isprintable() and not any(char.isspace() or char in awkward for char in text):
        return text
    return json.dumps(text, ensure_ascii=not text.isprintable())


def to_text(event: LogEvent) -> str:
    """One log line as ``time level event key=value ...``, the fields of :func:`to_json`."""
    record = _record(event)
    head = [str(record.pop(name)) for name in ("time", "level", "event")]
    return " ".join(head + [f"{key}={_text_value(value)}" for key, value in record.items()])


@implementer(ILogObserver)
@attrs.define
class LineObserver:
    """
    Writes one line per event at ``level`` or above, as ``render`` makes it.  With a ``reactor``,
    lines logged in the reactor thread are written together once per reactor
    turn (one write and flush for all the lines of a busy turn instead of one
    per line); lines from other threads, and every line once the reactor
    stops, go out at once.
    """

    stream: IO[str]
    reactor: Optional[ReactorLoop] = None
    render: Callable[[LogEvent], str] = to_json
    #: The least severe level written.
    level: LogLevel = LogLevel.debug
    _pending: list[str] = attrs.field(factory=list)
    _scheduled: bool = False

    def __call__(self, event: LogEvent) -> None:
        # The level check of Twisted's LogLevelFilterPredicate in one
        # comparison: one level for every namespace is all the config sets,
        # and the filtering observer's machinery was a visible part of the
        # audit line every exchange writes.
        level = event.get("log_level")
        if level is None or level < self.level:
            return
        line = self.render(event) + "\n"
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


def observer(settings: LogSettings, reactor: Optional[ReactorLoop] = None) -> ILogObserver:
    """The daemon's observer: format, level and destination from ``settings``."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(ReactorLoop, default_reactor)
    lines = LineObserver(
        _stream(settings.logfile), reactor, to_json if settings.format == "json" else to_text,
        level=_LEVELS.get(settings.level.lower(), LogLevel.info),
    )
    reactor.addSystemEventTrigger("after", "shutdown", lines.flush)
    return lines


def install(application: Componentized, settings: LogSettings, reactor: Optional[ReactorLoop] = None) -> None:
    """
    Make the observer for ``settings`` the one twistd starts for
    ``application`` (its ``ILogObserver`` component, which twistd reads when
    no ``--logger`` was given).
    """
    application.setComponent(ILogObserver, observer(settings, reactor))
