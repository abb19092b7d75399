"""
OpenTelemetry traces (observability.md), with nothing of OpenTelemetry on the
hot path when tracing is off.

The code that does the work asks :func:`current` for the daemon's
:class:`Tracing` and opens spans through it::

    with tracing.current().span("store.resolve"):
        resolution = await store.resolve(...)

Off (the default, or before the daemon starts), :func:`current` is
:data:`OFF`, whose spans are one shared object that does nothing: no
OpenTelemetry module is ever imported.  On, :func:`build` imports
:mod:`jwtlet.tracing.exporter` (the ``otel`` extra: spans recorded by
:mod:`~jwtlet.tracing.spans`, queued by :mod:`~jwtlet.tracing.export`, encoded
and posted by :mod:`~jwtlet.tracing.otlp` in a process of their own) and the
daemon installs what it returns for as long as it runs.  The tracer is process-wide, like
OpenTelemetry's own provider and Twisted's log publisher: every outbound HTTP
call, validator and signer is traced without each constructor taking it.

Span attributes are a closed vocabulary (the ``*_ATTRIBUTE`` names below plus
the HTTP ones): values are the caller's username, a participant context, a
plugin name, a method, a route template, a status code or an outcome, never
a token, a key, a secret or a claim value.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping, Optional, Protocol, Union

if TYPE_CHECKING:
    # Annotations only: importing the config package from here closes an
    # import cycle (outbound -> tracing -> config -> kubeconfig -> outbound).
    from jwtlet.config.schema import TracingConfig
    from jwtlet.metrics import Metrics

#: What a span attribute may hold.
AttributeValue = Union[str, bool, int, float]
Attributes = Mapping[str, AttributeValue]

CLIENT_ATTRIBUTE = "jwtlet.client"
PARTICIPANT_CONTEXT_ATTRIBUTE = "jwtlet.participant_context"
OUTCOME_ATTRIBUTE = "jwtlet.exchange.outcome"
VALIDATOR_ATTRIBUTE = "jwtlet.validator"
SIGNER_ATTRIBUTE = "jwtlet.signer"

#: The modules of the ``otel`` extra that tracing imports, and how to get them.
OTEL_MODULES = ("opentelemetry.trace", "opentelemetry.sdk.resources", "opentelemetry.proto.trace.v1.trace_pb2",
                "urllib3")
INSTALL_HINT = "pip install 'jwtlet[otel]'"

#: A request header by name (``None`` when absent), for W3C context extraction.
HeaderLookup = Callable[[str], Optional[str]]


class Span(Protocol):
    """An open span, as the code that does the work sees it."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Record one attribute (from the closed vocabulary above)."""

    def failed(self, error: BaseException) -> None:
        """Status error, named by the exception's type only: its message may quote a credential."""


class RequestSpan(Span, Protocol):
    """A server or client span: opened and ended by different calls."""

    def activate(self) -> ContextManager[object]:
        """The span as the current one, so that spans opened meanwhile become its children."""

    def rename(self, name: str) -> None:
        """A better name, known only once the span started (a server span's route template)."""

    def end(self, status_code: Optional[int] = None) -> None:
        """End the span; a status code from 500 (server) or 400 (client) up is an error."""


class Tracing:
    """
    The tracer of a daemon whose tracing is off: every span is :data:`NO_SPAN`.
    :class:`jwtlet.tracing.spans.Recorder` is the one that records.
    """

    enabled = False

    def span(self, name: str, attributes: Optional[Attributes] = None) -> ContextManager[Span]:
        """A child of the current span, current itself inside the ``with``; an exception marks it failed."""
        return NO_SPAN

    def annotate(self, key: str, value: AttributeValue) -> None:
        """An attribute on the current span (the request's, when no child is open)."""

    def server_span(self, name: str, attributes: Attributes, header: HeaderLookup) -> RequestSpan:
        """A request's span, the child of the W3C ``traceparent`` it arrived with, if any."""
        return NO_SPAN

    def client_span(self, name: str, attributes: Attributes) -> tuple[RequestSpan, Mapping[str, str]]:
        """An outbound call's span and the ``traceparent``/``tracestate`` headers the call carries."""
        return NO_SPAN, {}

    def shutdown(self) -> Callable[[], None]:
        """What flushes and stops the exporter: a blocking call, for a thread (the collector may hang)."""
        return _nothing


class _NoSpan:
    """The one span of :data:`OFF`: a context manager and a span that records nothing."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def failed(self, error: BaseException) -> None:
        pass

    def activate(self) -> _NoSpan:
        return self

    def rename(self, name: str) -> None:
        pass

    def end(self, status_code: Optional[int] = None) -> None:
        pass


def _nothing() -> None:
    pass


NO_SPAN = _NoSpan()
OFF = Tracing()
_installed: list[Tracing] = [OFF]


def current() -> Tracing:
    """The daemon's tracer, :data:`OFF` unless one is installed."""
    return _installed[-1]


def install(tracing: Tracing) -> None:
    """Make ``tracing`` the process's tracer (the daemon does, while it runs; tests do around a case)."""
    _installed.append(tracing)


def uninstall(tracing: Tracing) -> None:
    """Undo :func:`install` of ``tracing``."""
    if tracing in _installed[1:]:
        _installed.remove(tracing)


def missing_packages() -> list[str]:
    """The modules of the ``otel`` extra that cannot be imported here (found, not imported)."""
    missing = []
    for module in OTEL_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(module)
    return missing


def check(config: TracingConfig) -> list[str]:
    """Config problems only the installation can tell: tracing on without the extra."""
    if not config.enabled:
        return []
    missing = missing_packages()
    if not missing:
        return []
    return [f"tracing.enabled: OpenTelemetry is not installed ({', '.join(missing)} missing): {INSTALL_HINT}"]


def build(config: TracingConfig, metrics: Metrics) -> Tracing:
    """The tracer ``config`` asks for: :data:`OFF`, or one exporting over OTLP/HTTP (needs the extra)."""
    if not config.enabled:
        return OFF
    from jwtlet.tracing.exporter import exporting

    return exporting(config, metrics)
