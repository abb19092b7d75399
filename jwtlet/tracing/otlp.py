"""
OTLP over HTTP/protobuf: a batch of spans encoded as opentelemetry-proto's
``ExportTraceServiceRequest`` and posted to the collector, in the exporter
process (:mod:`jwtlet.tracing.exporter`).

Encoding does as little as it can: the Resource and the instrumentation
scope are built once, each attribute (a closed vocabulary of few values:
methods, routes, plugin names, outcomes) becomes its ``KeyValue`` once and is
copied from then on, and the spans are added in place to one request message.

The collector is the config's ``endpoint``, else the one the standard
``OTEL_EXPORTER_OTLP_TRACES_*`` / ``OTEL_EXPORTER_OTLP_*`` variables name,
which also give headers, a CA bundle, a client certificate and gzip.
"""

from __future__ import annotations

import gzip
from typing import Mapping, Optional, Sequence

import attrs
import urllib3
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags, Status
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.resources import Resource as SDKResource
from opentelemetry.util.re import parse_env_headers

from jwtlet.config.schema import TracingConfig
from jwtlet.tracing import AttributeValue
from jwtlet.tracing.spans import Finished

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
TRACES_PATH = "/v1/traces"
EXPORT_TIMEOUT_SECS = 5.0
SCOPE_NAME = "jwtlet"

#: Past this many distinct attribute values (an unusual variety of callers), the cache starts over.
MAX_CACHED_VALUES = 4096

LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
REMOTE_PARENT = LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def any_value(value: AttributeValue) -> AnyValue:
    # bool before int: True is an int too.
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=value)


class Encoder:
    """Batches of ended spans as the body of one OTLP/HTTP export request."""

    def __init__(self, service_name: str):
        # The SDK's resource: service.name, telemetry.sdk.*, and OTEL_RESOURCE_ATTRIBUTES as operators set them.
        resource = SDKResource.create({SERVICE_NAME: service_name})
        self.resource = Resource(attributes=[KeyValue(key=key, value=any_value(value))  # type: ignore[arg-type]
                                             for key, value in resource.attributes.items()])
        self.scope = InstrumentationScope(name=SCOPE_NAME)
        self.error = Status(code=Status.STATUS_CODE_ERROR)
        self.values: dict[tuple[str, type, AttributeValue], KeyValue] = {}

    def attribute(self, key: str, value: AttributeValue) -> KeyValue:
        cached = (key, type(value), value)  # the type too: True == 1 as a dict key
        found = self.values.get(cached)
        if found is None:
            if len(self.values) >= MAX_CACHED_VALUES:
                self.values.clear()
            found = self.values[cached] = KeyValue(key=key, value=any_value(value))
        return found

    def status(self, error: Optional[str]) -> Optional[Status]:
        if error is None:
            return None
        return Status(code=Status.STATUS_CODE_ERROR, message=error) if error else self.error

    def encode(self, spans: Sequence[Finished]) -> bytes:
        request = ExportTraceServiceRequest()
        add = request.resource_spans.add(resource=self.resource).scope_spans.add(scope=self.scope).spans.add
        attribute = self.attribute
        for name, kind, trace_id, span_id, parent_id, remote, trace_state, start, end, keys, values, error in spans:
            add(trace_id=trace_id, span_id=span_id, parent_span_id=parent_id, trace_state=trace_state, name=name,
                kind=kind, start_time_unix_nano=start, end_time_unix_nano=end,  # type: ignore[arg-type]
                attributes=[attribute(key, value) for key, value in zip(keys, values, strict=True)],
                status=self.status(error), flags=REMOTE_PARENT if remote else LOCAL_PARENT)
        return request.SerializeToString()


@attrs.frozen
class Collector:
    """Where and how the export thread posts."""

    url: str
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: A CA bundle's path (``None``: the system's).
    ca_file: Optional[str] = None
    #: A client certificate and its key's file, for a collector that wants mTLS.
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    gzip: bool = False
    timeout: float = EXPORT_TIMEOUT_SECS


def _variable(environ: Mapping[str, str], name: str) -> Optional[str]:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``: the exporter's precedence."""
    return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or None


def collector_endpoint(config: TracingConfig, environ: Mapping[str, str]) -> str:
    """The traces URL: the config's endpoint, else the standard variables', else the documented default."""
    if config.endpoint is not None:
        return config.endpoint.rstrip("/") + TRACES_PATH
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]  # a full URL, as the OTLP spec has it
    return (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/") + TRACES_PATH


def collector_for(config: TracingConfig, environ: Mapping[str, str]) -> Collector:
    return Collector(
        url=collector_endpoint(config, environ),
        headers=parse_env_headers(_variable(environ, "HEADERS") or "", liberal=True),
        ca_file=_variable(environ, "CERTIFICATE"),
        cert_file=_variable(environ, "CLIENT_CERTIFICATE"),
        key_file=_variable(environ, "CLIENT_KEY"),
        gzip=(_variable(environ, "COMPRESSION") or "").strip().lower() == "gzip",
    )


class Sender:
    """
    Posts encoded batches to the collector over kept-alive connections.
    urllib3 rather than requests: a third of the CPU per post.
    """

    def __init__(self, collector: Collector, encoder: Encoder):
        self.collector = collector
        self.encoder = encoder
        self.headers = {**collector.headers, "Content-Type": "application/x-protobuf"}
        if collector.gzip:
            self.headers["Content-Encoding"] = "gzip"
        # No retries: a batch the collector did not take is counted as dropped, and the next one tries again.
        self.pool = urllib3.PoolManager(retries=False, timeout=collector.timeout, ca_certs=collector.ca_file,
                                        cert_file=collector.cert_file, key_file=collector.key_file)

    def __call__(self, spans: Sequence[Finished]) -> bool:
        body = self.encoder.encode(spans)
        if self.collector.gzip:
            body = gzip.compress(body)
        try:
            response = self.pool.request("POST", self.collector.url, body=body, headers=self.headers)
        except urllib3.exceptions.HTTPError:
            return False  # down, refused, timed out: the batch is counted as dropped
        return 200 <= response.status < 300

    def close(self) -> None:
        self.pool.clear()
