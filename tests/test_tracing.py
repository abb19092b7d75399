"""
Traces (observability.md), in memory: the span tree of an exchange, W3C
context in and out, the attributes and what they must never hold, bounded
export that a hung collector cannot slow, and tracing off costing nothing.
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import attrs
import pytest
import pytest_twisted
import treq
from apps import ADMIN, BASE_CONFIG, CLIENT_AUDIENCE, WORKLOAD, Reply, make_apps, served
from google.protobuf.json_format import MessageToJson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from zope.interface import implementer

from jwtlet import config as configuration
from jwtlet import policy, tracing
from jwtlet.apikeys import keys as apikeys
from jwtlet.config.schema import TracingConfig
from jwtlet.interfaces import IValidator
from jwtlet.metrics import Metrics
from jwtlet.model import ApiKeyRecord, Identity, Integration, ResourceMapping, ScopeMapping
from jwtlet.outbound import OutboundHTTPClient
from jwtlet.testing.fakes import StaticValidator
from jwtlet.tracing import export, exporter, otlp, spans, web
from jwtlet.tracing.service import TracingService
from jwtlet.tracing.web import TracedResource, traced
from jwtlet.web import management_api, token_api
from jwtlet.web.server import BodyLimits

URL = "http://jwtlet.test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def settled(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "expected an already-fired Deferred"
    return results[0]


class FinishedSpan(NamedTuple):
    """A finished span (:data:`jwtlet.tracing.spans.Finished`), its fields named for reading."""

    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    remote_parent: bool
    trace_state: str
    start_ns: int
    end_ns: int
    keys: tuple[str, ...]
    values: tuple[Any, ...]
    error: Optional[str]

    @property
    def attributes(self) -> dict[str, Any]:
        return dict(zip(self.keys, self.values, strict=True))


@attrs.define
class Recorder:
    """A recording tracer whose sampled spans land in memory as they end."""

    tracer: spans.Recorder
    finished: list[spans.Finished]

    def spans(self) -> tuple[FinishedSpan, ...]:
        return tuple(FinishedSpan._make(span) for span in self.finished)

    def named(self, name: str) -> FinishedSpan:
        (span,) = [span for span in self.spans() if span.name == name]
        return span

    def wire(self) -> ExportTraceServiceRequest:
        """The spans as the collector would receive them."""
        return ExportTraceServiceRequest.FromString(otlp.Encoder("jwtlet").encode(self.finished))

    def everything(self) -> str:
        """All a trace backend would learn of the spans, as text: the export request's JSON and the records."""
        return MessageToJson(self.wire()) + repr(self.finished)


def recorder(sample_ratio: float = 1.0) -> Recorder:
    finished: list[spans.Finished] = []
    return Recorder(spans.Recorder(finished.append, sample_ratio), finished)


@pytest.fixture
def recording() -> Iterator[Recorder]:
    installed = recorder()
    tracing.install(installed.tracer)
    yield installed
    tracing.uninstall(installed.tracer)


# -- a validator that fetches keys over HTTP, as kubernetes-oidc does -------------


class KeysResource(Resource):
    """The JWKS endpoint of the fake issuer: remembers the ``traceparent`` each fetch carried."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.traceparents: list[Optional[bytes]] = []

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
        self.traceparents.append(request.getHeader(b"traceparent"))
        return b'{"keys": []}'


@implementer(IValidator)
@attrs.define
class FetchingValidator:
    """Fetches the issuer's keys through the daemon's outbound client, then knows its tokens."""

    client: OutboundHTTPClient
    known: StaticValidator

    async def validate(self, token: str, audience: Optional[str]) -> Identity:
        response = await self.client.get("https://issuer.test/keys", headers={"Accept": ["application/json"]})
        await treq.content(response)
        return await self.known.validate(token, audience)


@attrs.define
class Daemon:
    """The token port and the management port served in memory, with an issuer's JWKS behind the validator."""

    token: StubTreq
    management: StubTreq
    issuer_agent: RequestTraversalAgent
    keys: KeysResource
    known: StaticValidator
    metrics: Metrics
    store: Any

    def settle(self, deferred: Deferred[Any]) -> Any:
        results: list[Any] = []
        deferred.addBoth(results.append)
        for _ in range(10):
            self.token.flush()
            self.management.flush()
            self.issuer_agent.flush()
        assert results, "the request did not complete"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def call(self, stub: StubTreq, method: str, url: str, **kwargs: Any) -> Reply:
        response = self.settle(stub.request(method, url, **kwargs))
        return Reply(response.code, response.headers, self.settle(treq.content(response)))

    def exchange(self, subject_token: str = "token-workload", headers: Optional[dict[str, list[str]]] = None,
                 **fields: str) -> Reply:
        data = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": subject_token,
                "resource": "ctx", **fields}
        return self.call(self.token, "POST", f"{URL}/token", data=data, headers=headers or {})


def daemon(tmp_path: Path, tracer: tracing.Tracing, overrides: Optional[dict[str, Any]] = None) -> Daemon:
    from jwtlet.daemon.plugins import Providers
    from jwtlet.daemon.wiring import build_apis
    from jwtlet.providers import adapt

    apps = make_apps(tmp_path, overrides)
    keys = KeysResource()
    issuer_agent = RequestTraversalAgent(keys)
    validator = FetchingValidator(OutboundHTTPClient(issuer_agent, pool=None), apps.validator)  # type: ignore[arg-type]
    providers = Providers(store=apps.providers.store, signer=apps.providers.signer,
                          validator=adapt("validator", validator))
    config = configuration.parse(configuration.merge(
        configuration.merge(BASE_CONFIG, {"signer": {"key_file": str(tmp_path / "signing.jwk")}}), overrides or {}),
        data_dir=tmp_path)
    apis = build_apis(config, providers, apps.clock, apps.metrics, random_bytes=lambda n: bytes(range(n)))
    store = apps.store()
    settled(store.add_scope(ScopeMapping("read", {"role": "reader-claim-value"})))
    settled(store.add_mapping(ResourceMapping(WORKLOAD.username, "ctx", scopes=("read",), audiences=("edc",))))
    return Daemon(
        token=served(traced(apis.token_api.app.resource(), tracer), token_api.BODY_LIMITS),
        management=served(traced(apis.management_api.app.resource(), tracer), BodyLimits(management_api.MAX_BODY)),
        issuer_agent=issuer_agent, keys=keys, known=apps.validator, metrics=apps.metrics, store=store,
    )


def children(finished: Sequence[FinishedSpan], parent: FinishedSpan) -> list[str]:
    return [span.name for span in finished if span.parent_id == parent.span_id]


# -- the span tree and its attributes ---------------------------------------------------


def test_one_token_exchange_is_a_server_span_with_a_child_per_hop(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.exchange(scope="read", audience="edc")
    assert reply.code == 200, reply.body

    finished = recording.spans()
    server = recording.named("POST /token")
    assert server.parent_id == b"" and server.kind == spans.SERVER
    assert dict(server.attributes or {}) == {
        "http.request.method": "POST", "http.route": "/token", "http.response.status_code": 200,
        tracing.OUTCOME_ATTRIBUTE: "issued", tracing.CLIENT_ATTRIBUTE: WORKLOAD.username,
        tracing.PARTICIPANT_CONTEXT_ATTRIBUTE: "ctx",
    }
    assert children(finished, server) == ["validate", "store.resolve", "sign"]
    validate, sign = recording.named("validate"), recording.named("sign")
    assert dict(validate.attributes or {}) == {tracing.VALIDATOR_ATTRIBUTE: "kubernetes-oidc"}
    assert dict(sign.attributes or {}) == {tracing.SIGNER_ATTRIBUTE: "local-key"}
    # The JWKS fetch is a client span of its own, under validate.
    assert children(finished, validate) == ["GET"]
    fetch = recording.named("GET")
    assert fetch.kind == spans.CLIENT
    assert dict(fetch.attributes or {}) == {
        "http.request.method": "GET", "url.scheme": "https", "server.address": "issuer.test",
        "http.response.status_code": 200}
    assert {span.trace_id for span in finished} == {server.trace_id}
    assert all(span.error is None for span in finished)
    assert all(0 < span.start_ns <= span.end_ns for span in finished)


def test_an_outbound_call_carries_the_traceparent_of_its_client_span(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    served_daemon.exchange(scope="read", audience="edc")
    fetch = recording.named("GET")
    (sent,) = served_daemon.keys.traceparents
    assert sent is not None
    version, trace_id, parent_id, flags = sent.decode().split("-")
    assert (version, trace_id, parent_id) == ("00", fetch.trace_id.hex(), fetch.span_id.hex())
    assert int(flags, 16) & 1, "sampled"


def test_an_incoming_sampled_traceparent_makes_the_request_its_child_even_at_ratio_zero(tmp_path: Path) -> None:
    unsampled = recorder(sample_ratio=0.0)
    tracing.install(unsampled.tracer)
    try:
        served_daemon = daemon(tmp_path, unsampled.tracer)
        served_daemon.exchange(scope="read", audience="edc")
        assert unsampled.spans() == (), "ratio 0 and no parent: nothing is sampled"
        served_daemon.exchange(scope="read", audience="edc",
                               headers={"traceparent": [f"00-{TRACE_ID}-{PARENT_ID}-01"],
                                        "tracestate": ["mesh=1"]})
    finally:
        tracing.uninstall(unsampled.tracer)
    server = unsampled.named("POST /token")
    assert (server.trace_id.hex(), server.parent_id.hex()) == (TRACE_ID, PARENT_ID)
    assert server.remote_parent
    assert server.trace_state == "mesh=1"
    assert {"validate", "store.resolve", "sign", "GET"} <= {span.name for span in unsampled.spans()}
    # The JWKS fetch carries the caller's trace and tracestate on.
    sent = served_daemon.keys.traceparents[-1]
    assert sent is not None and sent.decode().split("-")[1] == TRACE_ID


def test_a_refused_exchange_says_its_error_code_and_the_failed_hop_only_its_type(
    tmp_path: Path, recording: Recorder
) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.exchange(subject_token="an attacker's garbage token")
    assert reply.code == 400 and reply.json()["error"] == "invalid_grant"
    server = recording.named("POST /token")
    assert server.attributes[tracing.OUTCOME_ATTRIBUTE] == "invalid_grant"
    assert server.error is None, "a refusal is an answer, not a server error"
    validate = recording.named("validate")
    assert validate.error == "TokenRejected"
    assert validate.attributes["error.type"] == "TokenRejected"
    (sent,) = [span for span in recording.wire().resource_spans[0].scope_spans[0].spans if span.name == "validate"]
    assert (sent.status.code, sent.status.message) == (sent.status.STATUS_CODE_ERROR, "TokenRejected")
    assert len(sent.events) == 0, "no exception event: its message could quote the token"


def test_a_dependency_down_is_an_error_span_with_the_type_only(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    served_daemon.known.down = True
    reply = served_daemon.exchange()
    assert reply.code == 503
    server = recording.named("POST /token")
    assert server.attributes[tracing.OUTCOME_ATTRIBUTE] == "temporarily_unavailable"
    assert server.error == "" and server.attributes["error.type"] == "503"
    assert recording.named("validate").error == "DependencyUnavailable"


def test_a_span_is_named_by_the_route_template_never_by_the_raw_path(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer, {"api_keys": {"profiles": {"p": {"audience": "a"}}}})
    served_daemon.call(served_daemon.token, "POST", f"{URL}/v0/token/secret-looking-profile",
                       data=b'{"api_key": "x"}', headers={"Content-Type": ["application/json"]})
    served_daemon.call(served_daemon.token, "GET", f"{URL}/no/such/path/carrying-a-value")
    served_daemon.call(served_daemon.token, "BREW", f"{URL}/token")
    names = [span.name for span in recording.spans() if span.kind == spans.SERVER]
    assert names == ["POST /v0/token/<profile>", "GET", "_OTHER"]
    everything = recording.everything()
    assert "secret-looking-profile" not in everything and "carrying-a-value" not in everything
    assert "BREW" not in everything
    (profiled, missing, brewed) = [span for span in recording.spans() if span.kind == spans.SERVER]
    assert profiled.attributes["http.route"] == "/v0/token/<profile>"
    assert missing.attributes["http.response.status_code"] == 404
    assert "http.route" not in missing.attributes


def test_the_management_port_names_its_caller_and_its_route(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.call(served_daemon.management, "GET", f"{URL}/api/v1/mappings",
                               headers={"Authorization": ["Bearer token-admin"]})
    assert reply.code == 200, reply.body
    server = recording.named("GET /api/v1/mappings")
    assert server.attributes[tracing.CLIENT_ATTRIBUTE] == ADMIN.username
    assert server.attributes["http.response.status_code"] == 200


SECRETISH = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=12,
                    max_size=40)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject_token=SECRETISH, claim_value=SECRETISH, wrong_key_secret=SECRETISH)
def test_no_token_api_key_or_claim_value_ever_appears_in_a_span(
    tmp_path_factory: pytest.TempPathFactory, subject_token: str, claim_value: str, wrong_key_secret: str
) -> None:
    """
    An attacker (or an honest workload) sends tokens, API keys and gets
    claims issued: none of those values may reach the trace backend, in any
    attribute, event, name or status of any span.
    """
    tmp_path = tmp_path_factory.mktemp("secrets")
    installed = recorder()
    tracing.install(installed.tracer)
    try:
        served_daemon = daemon(tmp_path, installed.tracer, {"api_keys": {"profiles": {"p": {"audience": "a"}}}})
        served_daemon.known.add(subject_token, WORKLOAD, CLIENT_AUDIENCE)
        settled(served_daemon.store.add_scope(ScopeMapping("secret-scope", {"custom": claim_value})))
        settled(served_daemon.store.add_mapping(
            ResourceMapping(WORKLOAD.username, "ctx2", scopes=("secret-scope",), audiences=("edc",))))
        issued = served_daemon.exchange(subject_token=subject_token, resource="ctx2", scope="secret-scope",
                                        audience="edc")
        assert issued.code == 200, issued.body
        access_token = issued.json()["access_token"]
        refused = served_daemon.exchange(subject_token=subject_token + "x")
        assert refused.code == 400
        settled(served_daemon.store.add_integration(Integration("acme")))
        made = apikeys.make_key("jwtk", "acme", "k1", lambda n: claim_value.encode()[:n].ljust(n, b"k"))
        settled(served_daemon.store.add_api_key(ApiKeyRecord("acme", made.key_id, made.secret_sha256)))
        for key in (made.text, f"jwtk.acme.k1.{wrong_key_secret}"):
            served_daemon.call(served_daemon.token, "POST", f"{URL}/v0/token/p",
                               data=json.dumps({"api_key": key}).encode(),
                               headers={"Content-Type": ["application/json"]})
    finally:
        tracing.uninstall(installed.tracer)
    everything = installed.everything()
    assert len(installed.spans()) >= 12
    for secret in (subject_token, claim_value, wrong_key_secret, access_token, made.text, made.text.split(".")[-1]):
        assert secret not in everything


def test_an_unsampled_incoming_traceparent_is_honoured_and_passed_on_unsampled(tmp_path: Path) -> None:
    """Parent-based sampling: the mesh decided not to trace this request, so jwtlet records none of it."""
    installed = recorder(sample_ratio=1.0)
    tracing.install(installed.tracer)
    try:
        served_daemon = daemon(tmp_path, installed.tracer)
        reply = served_daemon.exchange(scope="read", audience="edc",
                                       headers={"traceparent": [f"00-{TRACE_ID}-{PARENT_ID}-00"]})
    finally:
        tracing.uninstall(installed.tracer)
    assert reply.code == 200
    assert installed.spans() == ()
    (sent,) = served_daemon.keys.traceparents
    assert sent is not None
    version, trace_id, _, flags = sent.decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")


@pytest.mark.parametrize("garbage", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # the all-zero trace id is no trace
    f"00-{TRACE_ID}-0000000000000000-01",
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the version W3C forbids
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "00-" + "a" * 5000,
    "\u00e9\u00e9-not-a-traceparent\r\nx-injected: 1",
])
def test_a_forged_traceparent_starts_a_new_trace_and_changes_nothing_else(
    tmp_path: Path, recording: Recorder, garbage: str
) -> None:
    """An attacker sends a malformed traceparent: the exchange is served, in a trace of jwtlet's own."""
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.exchange(scope="read", audience="edc",
                                   headers={"traceparent": [garbage], "tracestate": ["x=\r\ny"]})
    assert reply.code == 200, reply.body
    server = recording.named("POST /token")
    assert server.parent_id == b"" and not server.remote_parent and server.trace_state == ""
    assert server.trace_id.hex() != TRACE_ID
    (sent,) = served_daemon.keys.traceparents
    assert sent is not None and sent.decode() == f"00-{server.trace_id.hex()}-{recording.named('GET').span_id.hex()}-01"


def test_the_sample_ratio_decides_new_traces_by_their_id_as_opentelemetry_does() -> None:
    assert spans.sampling_bound(1.0) == 2**64 and spans.sampling_bound(0.0) == 0
    half = recorder(sample_ratio=0.5)
    for _ in range(400):
        with half.tracer.span("root"):
            pass
    assert 100 < len(half.finished) < 300
    assert all(int.from_bytes(span[2][8:], "big") < 2**63 for span in half.finished)


def test_a_client_trying_many_paths_cannot_grow_the_route_cache() -> None:
    """An attacker requests endless distinct paths: the remembered route templates stay bounded."""
    from klein import Klein

    app = Klein()

    @app.route("/items/<name>")
    def item(request: Any, name: str) -> str:
        return "ok"

    resource = TracedResource(app.resource(), recorder().tracer)
    stub = served(resource, BodyLimits(1024))
    for index in range(web.MAX_CACHED_ROUTES + 10):
        settled(stub.get(f"{URL}/items/{index}"))
        stub.flush()
    assert 0 < len(resource.routes.known) <= web.MAX_CACHED_ROUTES


# -- the OTLP wire ------------------------------------------------------------------------


def finished_span(name: str = "validate", parent_id: bytes = b"\x01" * 8, remote: bool = False,
                  error: Optional[str] = None, **attributes: Any) -> spans.Finished:
    return (name, spans.INTERNAL, b"\x0a" * 16, b"\x02" * 8, parent_id, remote, "mesh=1", 1_000, 2_000,
            tuple(attributes), tuple(attributes.values()), error)


def test_spans_are_encoded_as_an_otlp_export_request_with_their_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=jwtlet-0")
    encoder = otlp.Encoder("jwtlet-eu")
    body = encoder.encode([
        finished_span("POST /token", parent_id=b"\x03" * 8, remote=True, text="a", number=3, flag=True, ratio=0.5),
        finished_span("sign", error="DependencyUnavailable"),
        finished_span("GET", error=""),
    ])
    (resource_spans,) = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "jwtlet-eu" and resource["k8s.pod.name"] == "jwtlet-0"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "jwtlet"
    server, sign, fetch = scope_spans.spans
    assert (server.name, server.trace_id, server.span_id, server.parent_span_id) == (
        "POST /token", b"\x0a" * 16, b"\x02" * 8, b"\x03" * 8)
    assert (server.kind, server.trace_state, server.start_time_unix_nano, server.end_time_unix_nano) == (
        server.SPAN_KIND_INTERNAL, "mesh=1", 1_000, 2_000)
    assert {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in server.attributes} == {
        "text": "a", "number": 3, "flag": True, "ratio": 0.5}
    assert server.attributes[2].value.WhichOneof("value") == "bool_value", "True is a bool, not the int 1"
    assert server.flags == otlp.REMOTE_PARENT and sign.flags == otlp.LOCAL_PARENT
    assert not server.HasField("status")
    assert (sign.status.code, sign.status.message) == (sign.status.STATUS_CODE_ERROR, "DependencyUnavailable")
    assert (fetch.status.code, fetch.status.message) == (fetch.status.STATUS_CODE_ERROR, "")


def test_a_caller_sending_endless_distinct_values_cannot_grow_the_encoders_cache() -> None:
    """Attribute values such as participant contexts come from clients: the cached KeyValues stay bounded."""
    encoder = otlp.Encoder("jwtlet")
    for start in range(0, otlp.MAX_CACHED_VALUES * 2, 500):
        encoder.encode([finished_span(**{tracing.PARTICIPANT_CONTEXT_ATTRIBUTE: f"ctx-{index}"})
                        for index in range(start, start + 500)])
        assert len(encoder.values) <= otlp.MAX_CACHED_VALUES
    decoded = ExportTraceServiceRequest.FromString(encoder.encode([finished_span(**{"x": "late"})]))
    assert decoded.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value == "late"


def test_the_standard_otlp_variables_give_headers_tls_and_compression() -> None:
    config = TracingConfig(enabled=True)
    assert otlp.collector_for(config, {}) == otlp.Collector("http://127.0.0.1:4318/v1/traces")
    collector = otlp.collector_for(config, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Basic%20abc,x-tenant=a",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=traces",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "/etc/client.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/etc/client.key",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
    })
    # The traces variable wins over the general one, as in OpenTelemetry's exporter.
    assert collector == otlp.Collector(
        "https://collector:4318/v1/traces", headers={"x-tenant": "traces"}, ca_file="/etc/ca.pem",
        cert_file="/etc/client.pem", key_file="/etc/client.key", gzip=True)
    both = otlp.collector_for(config, {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Basic%20abc,x-tenant=a"})
    assert both.headers == {"authorization": "Basic abc", "x-tenant": "a"}


@contextmanager
def busy_collector() -> Iterator[str]:
    """A collector that answers every export 503."""

    class Busy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_sender_posts_protobuf_batches_and_says_when_the_collector_did_not_take_them() -> None:
    from otlp_receiver import Receiver

    with Receiver() as receiver:
        sender = otlp.Sender(otlp.Collector(receiver.url + otlp.TRACES_PATH, headers={"x-tenant": "a"}),
                             otlp.Encoder("jwtlet"))
        assert sender([finished_span("one"), finished_span("two")])
        assert [span.name for span in receiver.wait_for(lambda received: len(received) == 2)] == ["one", "two"]
        assert receiver.paths == ["/v1/traces"]
    with busy_collector() as url:
        refused = otlp.Sender(otlp.Collector(url + otlp.TRACES_PATH), otlp.Encoder("jwtlet"))
        assert not refused([finished_span()])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    down = otlp.Sender(otlp.Collector(f"http://127.0.0.1:{port}/v1/traces", timeout=5), otlp.Encoder("jwtlet"))
    assert not down([finished_span()])
    sender.close()
    refused.close()
    down.close()


# -- the exporter process ------------------------------------------------------------------


def test_a_frame_carries_one_value_and_a_closed_pipe_ends_the_stream() -> None:
    import io

    buffer = io.BytesIO()
    batch = [finished_span("one", text="a", number=3), finished_span("two", error="")]
    exporter.write_frame(buffer, {"service_name": "jwtlet"})
    exporter.write_frame(buffer, batch)
    buffer.seek(0)
    assert exporter.read_frame(buffer) == {"service_name": "jwtlet"}
    assert exporter.read_frame(buffer) == batch
    assert exporter.read_frame(buffer) is None
    assert exporter.read_frame(io.BytesIO(buffer.getvalue()[:-3])) is not None  # the first frame is whole
    truncated = io.BytesIO(buffer.getvalue()[:-3])
    exporter.read_frame(truncated)
    assert exporter.read_frame(truncated) is None, "a writer that died mid-frame ends the stream"


def test_the_exporter_process_posts_each_batch_and_keeps_the_collectors_credentials_off_its_command_line() -> None:
    from otlp_receiver import Receiver

    with Receiver() as receiver:
        process = exporter.ExporterProcess(
            otlp.Collector(receiver.url + otlp.TRACES_PATH, headers={"authorization": "Bearer collector-secret"}),
            "jwtlet-child")
        try:
            assert process([finished_span("one"), finished_span("two")])
            assert process([finished_span("three")])
            child = process.child
            assert child is not None
            assert b"collector-secret" not in Path(f"/proc/{child.pid}/cmdline").read_bytes()
            received = receiver.wait_for(lambda spans: len(spans) == 3)
        finally:
            process.close()
    assert [(span.name, span.service) for span in received] == [
        ("one", "jwtlet-child"), ("two", "jwtlet-child"), ("three", "jwtlet-child")]
    assert child.poll() == 0, "closing its stdin ends the child"
    with busy_collector() as url:
        refusing = exporter.ExporterProcess(otlp.Collector(url + otlp.TRACES_PATH), "jwtlet")
        try:
            assert not refusing([finished_span()])
        finally:
            refusing.close()


def test_a_child_that_dies_fails_its_batch_and_is_replaced_only_after_a_delay() -> None:
    """A broken exporter must not be started again for every batch (a fork storm under load)."""
    process = exporter.ExporterProcess(otlp.Collector("http://127.0.0.1:9/v1/traces"), "jwtlet",
                                       command=[sys.executable, "-c", "pass"])
    assert not process([finished_span()])
    started = process.started_at
    assert not process([finished_span()])
    assert process.started_at == started and process.child is None, "not restarted within the delay"
    assert started is not None
    process.started_at = started - exporter.RESTART_DELAY_SECS
    assert not process([finished_span()])
    assert process.started_at != started - exporter.RESTART_DELAY_SECS, "restarted after it"
    process.close()


# -- export: bounded, counted, never in the request's way ---------------------------------


@attrs.define
class HangingCollector:
    """A collector that never answers: each batch blocks until released, then fails."""

    release: threading.Event = attrs.field(factory=threading.Event)
    attempts: int = 0

    def __call__(self, batch: Sequence[spans.Finished]) -> bool:
        self.attempts += 1
        self.release.wait(30)
        return False


def ended_spans(queue: export.ExportQueue, count: int) -> None:
    tracer = spans.Recorder(queue.add, 1.0)
    for index in range(count):
        with tracer.span(f"span-{index}"):
            pass


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("jwtlet_trace_spans_dropped_total", {"reason": reason}) or 0


def test_a_full_queue_drops_spans_and_counts_them_without_waiting() -> None:
    metrics = Metrics()
    hanging = HangingCollector()
    queue = export.ExportQueue(hanging, metrics, capacity=4, delay=0.01)
    started = time.monotonic()
    ended_spans(queue, 100)
    assert time.monotonic() - started < 5, "ending spans never waits for the collector"
    # At most one batch is in the hung export and at most a queue's worth waits.
    full = dropped(metrics, "queue_full")
    assert full >= 100 - 4 - 4
    assert queue.waiting <= 4
    hanging.release.set()
    queue.shutdown()
    assert dropped(metrics, "export_failed") + full + queue.waiting == 100
    assert b"jwtlet_trace_spans_dropped_total" in metrics.exposition()


def test_an_export_the_collector_refused_is_counted_as_dropped() -> None:
    metrics = Metrics()
    queue = export.ExportQueue(lambda batch: False, metrics, capacity=64)
    ended_spans(queue, 3)
    queue.flush()
    assert dropped(metrics, "export_failed") == 3
    assert queue.waiting == 0
    queue.shutdown()


def test_an_exporter_that_raises_loses_its_batch_counted_and_the_thread_goes_on() -> None:
    metrics = Metrics()
    calls: list[int] = []

    first_batch = threading.Event()

    def broken(batch: Sequence[spans.Finished]) -> bool:
        calls.append(len(batch))
        first_batch.set()
        raise ValueError("a bug in the exporter")

    queue = export.ExportQueue(broken, metrics, capacity=64, delay=0.01)
    ended_spans(queue, 2)
    assert first_batch.wait(10), "the export thread took the first batch"
    ended_spans(queue, 1)
    queue.shutdown()
    assert dropped(metrics, "export_failed") == 3 and sum(calls) == 3


def test_the_export_thread_sends_whole_batches_and_the_rest_after_its_delay() -> None:
    """Few large posts, not one per span: a batch's worth wakes the thread, a partial one waits for the delay."""
    batches: list[list[str]] = []
    arrived = threading.Condition()

    def collector(batch: Sequence[spans.Finished]) -> bool:
        with arrived:
            batches.append([span[0] for span in batch])
            arrived.notify_all()
        return True

    queue = export.ExportQueue(collector, Metrics(), capacity=64, delay=3600, batch=4)
    ended_spans(queue, 10)
    with arrived:
        arrived.wait_for(lambda: sum(map(len, batches)) >= 8, 10)
    assert [len(batch) for batch in batches] == [4, 4] and queue.waiting == 2
    queue.shutdown()  # what is left goes on stop
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert [name for batch in batches for name in batch] == [f"span-{index}" for index in range(10)]


def test_a_queued_span_is_no_work_for_the_garbage_collector() -> None:
    """
    Spans wait for export up to a second: queued as objects the collector
    tracks, they would reach the oldest generation and make full collections
    of the daemon's heap twice as frequent.
    """
    queued: list[spans.Finished] = []
    tracer = spans.Recorder(queued.append, 1.0)
    server = tracer.server_span("POST", {"http.request.method": "POST"}, lambda name: None)
    with server.activate(), tracer.span("validate", {tracing.VALIDATOR_ATTRIBUTE: "kubernetes-oidc"}):
        tracer.annotate(tracing.CLIENT_ATTRIBUTE, "system:serviceaccount:ns:sa")
    server.end(200)
    gc.collect(0)  # the young generation's pass, and the middle one's: spans never reach the oldest
    gc.collect(1)
    assert len(queued) == 2
    assert not any(gc.is_tracked(span) for span in queued)


@pytest.fixture
def silent_collector() -> Iterator[str]:
    """A collector that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_collector_that_hangs_changes_nothing_for_clients(tmp_path: Path, silent_collector: str) -> None:
    metrics = Metrics()
    process = exporter.ExporterProcess(otlp.Collector(silent_collector + otlp.TRACES_PATH, timeout=30), "jwtlet")
    queue = export.ExportQueue(process, metrics, capacity=16, delay=0.001)
    tracer = spans.Recorder(queue.add, 1.0, queue.shutdown)
    tracing.install(tracer)
    try:
        served_daemon = daemon(tmp_path, tracer)
        started = time.monotonic()
        replies = [served_daemon.exchange(scope="read", audience="edc") for _ in range(60)]
        elapsed = time.monotonic() - started
    finally:
        tracing.uninstall(tracer)
    assert [reply.code for reply in replies] == [200] * 60
    # 60 in-memory exchanges take well under a second; an export in their way would take 30 s.
    assert elapsed < 15
    assert dropped(metrics, "queue_full") > 0
    # The daemon's stop gives up on the hung collector instead of hanging with it.
    clock = Clock()
    reactor = ThreadedClock(clock)
    service = TracingService(tracer, reactor, timeout=2.0)
    service.startService()
    stopping = service.stopService()
    clock.advance(2.0)
    assert settled(stopping) is None


@attrs.define
class ThreadedClock:
    """A Clock that also takes calls from threads (they run at the next advance, on the test's thread)."""

    clock: Clock
    #: set whenever a thread hands over a call, so the test waits for it instead of polling
    called: threading.Event = attrs.field(factory=threading.Event)

    def callLater(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Twisted's name
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callFromThread(self, function: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.clock.callLater(0, function, *args)
        self.called.set()


def test_the_daemon_installs_its_tracer_while_it_runs_and_flushes_on_stop() -> None:
    installed = recorder()
    clock = Clock()
    threaded = ThreadedClock(clock)
    service = TracingService(installed.tracer, threaded)
    assert tracing.current() is tracing.OFF
    service.startService()
    assert tracing.current() is installed.tracer
    with tracing.current().span("work"):
        pass
    stopping = service.stopService()
    while not stopping.called:
        # The flush runs in its own thread and hands its end to the reactor.
        assert threaded.called.wait(10), "the flush never finished"
        threaded.called.clear()
        clock.advance(0)
    assert settled(stopping) is None
    assert tracing.current() is tracing.OFF
    assert [span.name for span in installed.spans()] == ["work"]


# -- off, and the extra missing ---------------------------------------------------------


def test_off_the_sites_are_not_wrapped_and_spans_are_one_shared_no_op() -> None:
    resource = Resource()
    assert traced(resource, tracing.OFF) is resource
    assert isinstance(traced(resource, recorder().tracer), TracedResource)
    with tracing.OFF.span("validate", {"x": 1}) as span:
        span.set_attribute("y", 2)
    assert span is tracing.NO_SPAN
    assert tracing.build(TracingConfig(), Metrics()) is tracing.OFF


def test_off_no_opentelemetry_module_is_imported_serving_an_exchange(tmp_path: Path) -> None:
    """The hot path with tracing off, in a fresh interpreter: OpenTelemetry stays unimported."""
    script = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}]
from pathlib import Path
from apps import WORKLOAD, call, make_apps
from jwtlet import policy, tracing
from jwtlet.config.schema import TracingConfig
from jwtlet.daemon import wiring
from jwtlet.model import ResourceMapping
from jwtlet.tracing.web import traced
apps = make_apps(Path({str(tmp_path)!r}))
apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx"))
tracer = tracing.build(TracingConfig(), apps.metrics)
assert traced(apps.token_api.app.resource(), tracer) is not None
reply = call(apps.token, "POST", "http://jwtlet.test/token", data={{
    "grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload", "resource": "ctx"}})
assert reply.code == 200, reply.body
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
"""
    # Run from tmp_path: from the checkout, ``python -c`` would import the source tree, not the installed package.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,  # noqa: S603
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_check_config_names_the_extra_when_tracing_is_on_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jwtlet.cli.main import main

    path = tmp_path / "jwtlet.yaml"
    raw = configuration.merge(BASE_CONFIG, {
        "issuer": "https://jwtlet.test", "signer": {"key_file": str(tmp_path / "k.jwk"), "generate": True},
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "db.sqlite3")},
        "validator": {"type": "kubernetes-oidc", "issuers": [{"issuer": "https://k8s.test",
                                                               "jwks_uri": "https://k8s.test/jwks"}]},
        "tracing": {"enabled": True, "endpoint": "http://collector.test:4318"},
    })
    path.write_text(json.dumps(raw))
    assert main(["check-config", "--config", str(path)]) == 0, capsys.readouterr().err
    monkeypatch.setattr(tracing, "OTEL_MODULES", ("opentelemetry_not_installed_here.sdk",))
    assert main(["check-config", "--config", str(path)]) == 1
    error = capsys.readouterr().err
    assert "tracing.enabled" in error and "pip install 'jwtlet[otel]'" in error
    assert tracing.check(TracingConfig(enabled=False)) == []


@pytest.mark.parametrize(("section", "problem"), [
    ({"sample_ratio": 1.5}, "tracing.sample_ratio: must be between 0 and 1"),
    ({"endpoint": "collector:4318"}, "tracing.endpoint: must be an absolute http(s) URL"),
    ({"enabled": "yes"}, "tracing.enabled: must be true or false"),
    ({"service_name": ""}, "tracing.service_name"),
    ({"exporter": "zipkin"}, "tracing.exporter: unknown key"),
])
def test_the_tracing_section_is_checked(section: dict[str, Any], problem: str) -> None:
    config, problems = configuration.read(configuration.merge(BASE_CONFIG, {"tracing": section}))
    assert any(found.startswith(problem) for found in problems), problems


def test_the_tracing_section_defaults_to_off() -> None:
    config = configuration.parse(BASE_CONFIG)
    assert config.tracing == TracingConfig(enabled=False, endpoint=None, service_name="jwtlet", sample_ratio=1.0)
    written = configuration.parse(configuration.merge(BASE_CONFIG, {"tracing": {
        "enabled": True, "endpoint": "https://otel.example:4318/", "service_name": "jwtlet-eu", "sample_ratio": 0.25}}))
    assert written.tracing == TracingConfig(True, "https://otel.example:4318/", "jwtlet-eu", 0.25)
    assert otlp.collector_endpoint(written.tracing, {}) == "https://otel.example:4318/v1/traces"
    assert otlp.collector_endpoint(config.tracing, {}) == "http://127.0.0.1:4318/v1/traces"
    # The standard variables name the collector when the config does not, the traces one as it is.
    assert otlp.collector_endpoint(config.tracing, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == (
        "http://c:4318/v1/traces")
    assert otlp.collector_endpoint(config.tracing, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/spans",
    }) == "http://t:1/spans"
    assert otlp.collector_endpoint(written.tracing, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/spans"}) == (
        "https://otel.example:4318/v1/traces"), "the config wins"


def test_the_configuration_reference_documents_the_tracing_section() -> None:
    reference = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = reference.split("## `tracing`", 1)[1].split("\n## ", 1)[0]
    for field in attrs.fields(TracingConfig):
        assert f"| `{field.name}` |" in section, field.name


# -- ext_authz over gRPC ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_envoy_grpc_check_joins_the_trace_its_metadata_carries(recording: Recorder) -> None:
    """Envoy sends its traceparent as gRPC metadata: the check is a span inside the mesh's trace."""
    import grpc
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    from jwtlet.extauthz.decide import Decision, ExtAuthz
    from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2 as external_auth
    from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2_grpc as external_auth_grpc
    from jwtlet.extauthz.grpc_server import CHECK_SPAN, GrpcService
    from jwtlet.providers import adapt
    from jwtlet.testing.process import free_port

    class Allow:
        async def exchange(self, identity: Identity, resource: Optional[str]) -> Decision:
            return Decision.allow("target-token")

    known = StaticValidator()
    known.add("token-web", WORKLOAD, "mesh")
    decider = ExtAuthz(adapt("validator", known), "mesh", Allow(), "x-jwtlet-resource", Metrics(),
                       validator_name="kubernetes-oidc")
    service = GrpcService(decider, f"tcp:{free_port()}", reactor)  # type: ignore[arg-type]
    service.startService()

    def check() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            request = external_auth.CheckRequest()
            request.attributes.request.http.headers["authorization"] = "Bearer token-web"
            return external_auth_grpc.AuthorizationStub(channel).Check(
                request, metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")], timeout=10)

    try:
        response = await deferToThread(check)
    finally:
        await service.stopService()
    assert response.status.code == 0
    server = recording.named(CHECK_SPAN)
    assert server.kind == spans.SERVER and server.remote_parent
    assert (server.trace_id.hex(), server.parent_id.hex()) == (TRACE_ID, PARENT_ID)
    assert server.attributes[tracing.CLIENT_ATTRIBUTE] == WORKLOAD.username
    assert server.attributes["rpc.system"] == "grpc"
    assert children(recording.spans(), server) == ["validate"]
    assert recording.named("validate").attributes[tracing.VALIDATOR_ATTRIBUTE] == "kubernetes-oidc"
    everything = recording.everything()
    assert "token-web" not in everything and "target-token" not in everything
