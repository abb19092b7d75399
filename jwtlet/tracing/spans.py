"""
The recording tracer: spans as small slotted records, W3C trace context in
and out, parent-based ratio sampling, each ended sampled span handed to a
sink (the export queue, :mod:`jwtlet.tracing.export`).

Why not OpenTelemetry's SDK: it spends about 30 us of the reactor's time on
each span (locks, span processors, attribute validation, context objects),
and an exchange opens four; tracing on must cost at most 15% of throughput
(issue 18).  A span here is one object, ids come from :mod:`random` like the
SDK's, the current span is one :class:`contextvars.ContextVar` (Twisted gives
each coroutine its own copy of the context, so a request's spans nest as
they did with the SDK), and nothing is validated that the closed attribute
vocabulary (:mod:`jwtlet.tracing`) already rules out.  The W3C
``traceparent`` of an incoming request is parsed by OpenTelemetry's own
propagator; the one sent out is a fixed format, written here.

Only :func:`jwtlet.tracing.build` imports this module, when tracing is on.
"""

from __future__ import annotations

import random
import time
from contextvars import ContextVar, Token
from typing import Callable, Mapping, Optional, Tuple

from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from jwtlet.tracing import Attributes, AttributeValue, HeaderLookup, Tracing

INTERNAL = OtlpSpan.SPAN_KIND_INTERNAL
SERVER = OtlpSpan.SPAN_KIND_SERVER
CLIENT = OtlpSpan.SPAN_KIND_CLIENT

#: W3C trace context only (``traceparent``/``tracestate``), never baggage.
PROPAGATOR = TraceContextTextMapPropagator()


#: An ended span as the exporter gets it: name, kind, trace id, span id, parent
#: id (empty for a root), whether that parent is remote, the tracestate,
#: start and end (ns since the epoch), the attributes' keys and their values,
#: and the error (``None``: status unset; else its description, "" for none).
Finished = Tuple[str, int, bytes, bytes, bytes, bool, str, int, int, Tuple[str, ...], Tuple[AttributeValue, ...],
                 Optional[str]]
#: Where ended sampled spans go.
Sink = Callable[[Finished], None]


class RecordedSpan:
    """
    One span: what the code that does the work writes to while it is open
    (:class:`jwtlet.tracing.RequestSpan`), and what the exporter reads once
    it ended.  As a ``with`` block it is a child span: current inside, ended
    (and failed, if the block raised) on leaving.
    """

    __slots__ = ("name", "kind", "trace_id", "span_id", "parent_id", "remote_parent", "sampled", "trace_state",
                 "attributes", "start_ns", "end_ns", "error", "sink", "token")

    def __init__(self, name: str, kind: int, trace_id: bytes, parent_id: bytes, remote_parent: bool, sampled: bool,
                 trace_state: str, attributes: Optional[Attributes], sink: Sink):
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = random_id(8)
        #: Empty for a root span.
        self.parent_id = parent_id
        self.remote_parent = remote_parent
        self.sampled = sampled
        #: The W3C ``tracestate`` header the trace arrived with, passed on as it came ("" when none).
        self.trace_state = trace_state
        self.attributes: dict[str, AttributeValue] = dict(attributes) if attributes else {}
        self.start_ns = time.time_ns()
        self.end_ns = 0
        #: ``None`` while the status is unset; else the error's description ("" when there is none).
        self.error: Optional[str] = None
        self.sink = sink
        self.token: Optional[Token[Optional[RecordedSpan]]] = None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value

    def failed(self, error: BaseException) -> None:
        # Never the message, nor an exception event: either may quote a token.
        self.attributes["error.type"] = self.error = type(error).__name__

    def activate(self) -> Activation:
        return Activation(self)

    def rename(self, name: str) -> None:
        self.name = name

    def end(self, status_code: Optional[int] = None) -> None:
        if self.end_ns:
            return  # ended already: a span is exported once
        if status_code is not None:
            self.attributes["http.response.status_code"] = status_code
            # A server's 4xx is the client's mistake; a client's is the call's failure.
            if status_code >= (400 if self.kind == CLIENT else 500):
                self.attributes["error.type"] = str(status_code)
                self.error = ""
        self.end_ns = time.time_ns()
        if self.sampled:
            # A tuple of atomic values and tuples of them (never a dict: a
            # tuple holding one stays tracked), which the garbage collector
            # stops tracking before it could reach the oldest generation.
            # Span objects waiting for export would get there, and make full
            # collections of the daemon's heap come twice as often (measured
            # under the benchmark's load).
            attributes = self.attributes
            self.sink((self.name, self.kind, self.trace_id, self.span_id, self.parent_id, self.remote_parent,
                       self.trace_state, self.start_ns, self.end_ns, tuple(attributes), tuple(attributes.values()),
                       self.error))

    def __enter__(self) -> RecordedSpan:
        self.token = CURRENT.set(self)
        return self

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException], _: object) -> None:
        if self.token is not None:
            CURRENT.reset(self.token)
        if error is not None:
            self.failed(error)
        self.end()


class Activation:
    """A span made current for a ``with`` block, without ending it on leaving (a server span's)."""

    __slots__ = ("span", "token")

    def __init__(self, span: RecordedSpan):
        self.span = span
        self.token: Optional[Token[Optional[RecordedSpan]]] = None

    def __enter__(self) -> RecordedSpan:
        self.token = CURRENT.set(self.span)
        return self.span

    def __exit__(self, *exc_info: object) -> None:
        if self.token is not None:
            CURRENT.reset(self.token)


#: The open span that new spans become children of.
CURRENT: ContextVar[Optional[RecordedSpan]] = ContextVar("jwtlet_span", default=None)


def random_id(size: int) -> bytes:
    """A trace (16 bytes) or span (8 bytes) id: random, never all zeros (W3C: that is no id)."""
    value = 0
    while not value:
        value = random.getrandbits(size * 8)
    return value.to_bytes(size, "big")


def sampling_bound(ratio: float) -> int:
    """OpenTelemetry's ``TraceIdRatioBased``: a new trace is sampled when its id's low 64 bits are below this."""
    return round(ratio * 2**64)


def traceparent(span: RecordedSpan) -> dict[str, str]:
    """The W3C headers that make the receiver's spans children of ``span``."""
    headers = {"traceparent": f"00-{span.trace_id.hex()}-{span.span_id.hex()}-{'01' if span.sampled else '00'}"}
    if span.trace_state:
        headers["tracestate"] = span.trace_state
    return headers


class _HeaderGetter:
    """``traceparent`` and ``tracestate`` of a request, through a lookup function."""

    def get(self, carrier: HeaderLookup, key: str) -> Optional[list[str]]:
        value = carrier(key)
        return None if value is None else [value]

    def keys(self, carrier: HeaderLookup) -> list[str]:
        return []  # the W3C propagator asks for its two headers by name


_GETTER = _HeaderGetter()


def remote_parent(header: HeaderLookup) -> Optional[trace.SpanContext]:
    """The caller's span from a valid W3C ``traceparent`` (and its ``tracestate``), if the request carries one."""
    if header("traceparent") is None:
        return None  # the usual case without a mesh: no parsing at all
    context = PROPAGATOR.extract(header, getter=_GETTER)  # type: ignore[arg-type]
    parent = trace.get_current_span(context).get_span_context()
    return parent if parent.is_valid else None


class Recorder(Tracing):
    """The tracer of a daemon whose tracing is on: sampled spans go to ``sink`` as they end."""

    enabled = True

    def __init__(self, sink: Sink, sample_ratio: float,
                 stop: Callable[[], None] = lambda: None):
        self.sink = sink
        self.bound = sampling_bound(sample_ratio)
        self.stop = stop

    def root(self, name: str, kind: int, attributes: Optional[Attributes]) -> RecordedSpan:
        """The first span of a new trace, sampled by the ratio."""
        trace_id = random_id(16)
        sampled = int.from_bytes(trace_id[8:], "big") < self.bound
        return RecordedSpan(name, kind, trace_id, b"", False, sampled, "", attributes, self.sink)

    def child(self, name: str, kind: int, attributes: Optional[Attributes]) -> RecordedSpan:
        """A child of the current span, or a root when there is none."""
        parent = CURRENT.get()
        if parent is None:
            return self.root(name, kind, attributes)
        # Parent-based: a child is sampled exactly when its parent is.
        return RecordedSpan(name, kind, parent.trace_id, parent.span_id, False, parent.sampled, parent.trace_state,
                            attributes, self.sink)

    def span(self, name: str, attributes: Optional[Attributes] = None) -> RecordedSpan:
        return self.child(name, INTERNAL, attributes)

    def annotate(self, key: str, value: AttributeValue) -> None:
        span = CURRENT.get()
        if span is not None:
            span.attributes[key] = value

    def server_span(self, name: str, attributes: Attributes, header: HeaderLookup) -> RecordedSpan:
        parent = remote_parent(header)
        if parent is None:
            return self.root(name, SERVER, attributes)
        # An incoming sampled traceparent is always honoured, an unsampled one too (observability.md).
        return RecordedSpan(name, SERVER, parent.trace_id.to_bytes(16, "big"), parent.span_id.to_bytes(8, "big"),
                            True, parent.trace_flags.sampled, parent.trace_state.to_header(), attributes, self.sink)

    def client_span(self, name: str, attributes: Attributes) -> tuple[RecordedSpan, Mapping[str, str]]:
        span = self.child(name, CLIENT, attributes)
        return span, traceparent(span)

    def shutdown(self) -> Callable[[], None]:
        return self.stop
