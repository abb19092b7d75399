"""
Traces (observability.md), in memory: the span tree of an exchange, W3C
context in and out, the attributes and what they must never hold, bounded
export that a hung collector cannot slow, and tracing off costing nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import attrs
import pytest
import pytest_twisted
import treq
from apps import ADMIN, BASE_CONFIG, CLIENT_AUDIENCE, WORKLOAD, Reply, make_apps, served
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
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
from jwtlet.tracing import otel
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


@attrs.define
class Recorder:
    """An installed recording tracer whose spans land in memory."""

    tracer: otel.OtelTracing
    exported: InMemorySpanExporter

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exported.get_finished_spans())

    def named(self, name: str) -> ReadableSpan:
        (span,) = [span for span in self.spans() if span.name == name]
        return span


def recorder(sample_ratio: float = 1.0) -> Recorder:
    exported = InMemorySpanExporter()
    provider = otel.provider_for(TracingConfig(enabled=True, sample_ratio=sample_ratio),
                                 SimpleSpanProcessor(exported))
    return Recorder(otel.OtelTracing(provider), exported)


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


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    return [span.name for span in spans if span.parent is not None and span.parent.span_id == parent.context.span_id]


# -- the span tree and its attributes ---------------------------------------------------


def test_one_token_exchange_is_a_server_span_with_a_child_per_hop(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.exchange(scope="read", audience="edc")
    assert reply.code == 200, reply.body

    spans = recording.spans()
    server = recording.named("POST /token")
    assert server.parent is None and server.kind is SpanKind.SERVER
    assert dict(server.attributes or {}) == {
        "http.request.method": "POST", "http.route": "/token", "http.response.status_code": 200,
        tracing.OUTCOME_ATTRIBUTE: "issued", tracing.CLIENT_ATTRIBUTE: WORKLOAD.username,
        tracing.PARTICIPANT_CONTEXT_ATTRIBUTE: "ctx",
    }
    assert children(spans, server) == ["validate", "store.resolve", "sign"]
    validate, sign = recording.named("validate"), recording.named("sign")
    assert dict(validate.attributes or {}) == {tracing.VALIDATOR_ATTRIBUTE: "kubernetes-oidc"}
    assert dict(sign.attributes or {}) == {tracing.SIGNER_ATTRIBUTE: "local-key"}
    # The JWKS fetch is a client span of its own, under validate.
    assert children(spans, validate) == ["GET"]
    fetch = recording.named("GET")
    assert fetch.kind is SpanKind.CLIENT
    assert dict(fetch.attributes or {}) == {
        "http.request.method": "GET", "url.scheme": "https", "server.address": "issuer.test",
        "http.response.status_code": 200}
    assert {span.context.trace_id for span in spans if span.context} == {server.context.trace_id}  # type: ignore[union-attr]
    assert all(span.status.status_code is StatusCode.UNSET for span in spans)


def test_an_outbound_call_carries_the_traceparent_of_its_client_span(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    served_daemon.exchange(scope="read", audience="edc")
    fetch = recording.named("GET")
    assert fetch.context is not None
    (sent,) = served_daemon.keys.traceparents
    assert sent is not None
    version, trace_id, parent_id, flags = sent.decode().split("-")
    assert (version, trace_id, parent_id) == ("00", f"{fetch.context.trace_id:032x}", f"{fetch.context.span_id:016x}")
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
    assert server.context is not None and server.parent is not None
    assert (f"{server.context.trace_id:032x}", f"{server.parent.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert server.parent.is_remote
    assert str(server.context.trace_state.get("mesh")) == "1"
    assert {"validate", "store.resolve", "sign", "GET"} <= {span.name for span in unsampled.spans()}


def test_a_refused_exchange_says_its_error_code_and_the_failed_hop_only_its_type(
    tmp_path: Path, recording: Recorder
) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.exchange(subject_token="an attacker's garbage token")
    assert reply.code == 400 and reply.json()["error"] == "invalid_grant"
    server = recording.named("POST /token")
    assert (server.attributes or {})[tracing.OUTCOME_ATTRIBUTE] == "invalid_grant"
    assert server.status.status_code is StatusCode.UNSET, "a refusal is an answer, not a server error"
    validate = recording.named("validate")
    assert validate.status.status_code is StatusCode.ERROR
    assert validate.status.description == "TokenRejected"
    assert (validate.attributes or {})["error.type"] == "TokenRejected"
    assert validate.events == (), "no exception event: its message could quote the token"


def test_a_dependency_down_is_an_error_span_with_the_type_only(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    served_daemon.known.down = True
    reply = served_daemon.exchange()
    assert reply.code == 503
    server = recording.named("POST /token")
    assert (server.attributes or {})[tracing.OUTCOME_ATTRIBUTE] == "temporarily_unavailable"
    assert server.status.status_code is StatusCode.ERROR
    assert recording.named("validate").status.description == "DependencyUnavailable"


def test_a_span_is_named_by_the_route_template_never_by_the_raw_path(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer, {"api_keys": {"profiles": {"p": {"audience": "a"}}}})
    served_daemon.call(served_daemon.token, "POST", f"{URL}/v0/token/secret-looking-profile",
                       data=b'{"api_key": "x"}', headers={"Content-Type": ["application/json"]})
    served_daemon.call(served_daemon.token, "GET", f"{URL}/no/such/path/carrying-a-value")
    served_daemon.call(served_daemon.token, "BREW", f"{URL}/token")
    names = [span.name for span in recording.spans() if span.kind is SpanKind.SERVER]
    assert names == ["POST /v0/token/<profile>", "GET", "_OTHER"]
    everything = json.dumps([span.to_json() for span in recording.spans()])
    assert "secret-looking-profile" not in everything and "carrying-a-value" not in everything
    assert "BREW" not in everything
    (profiled, missing, brewed) = [span for span in recording.spans() if span.kind is SpanKind.SERVER]
    assert (profiled.attributes or {})["http.route"] == "/v0/token/<profile>"
    assert (missing.attributes or {})["http.response.status_code"] == 404
    assert "http.route" not in (missing.attributes or {})


def test_the_management_port_names_its_caller_and_its_route(tmp_path: Path, recording: Recorder) -> None:
    served_daemon = daemon(tmp_path, recording.tracer)
    reply = served_daemon.call(served_daemon.management, "GET", f"{URL}/api/v1/mappings",
                               headers={"Authorization": ["Bearer token-admin"]})
    assert reply.code == 200, reply.body
    server = recording.named("GET /api/v1/mappings")
    assert (server.attributes or {})[tracing.CLIENT_ATTRIBUTE] == ADMIN.username
    assert (server.attributes or {})["http.response.status_code"] == 200


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
    everything = json.dumps([span.to_json() for span in installed.spans()])
    assert len(installed.spans()) >= 12
    for secret in (subject_token, claim_value, wrong_key_secret, access_token, made.text, made.text.split(".")[-1]):
        assert secret not in everything


# -- export: bounded, counted, never in the request's way ---------------------------------


class HangingExporter(SpanExporter):
    """A collector that never answers: each export blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.attempts = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.attempts += 1
        self.release.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


def ended_spans(processor: otel.BoundedSpanProcessor, count: int) -> None:
    provider = otel.provider_for(TracingConfig(enabled=True), processor)
    tracer = provider.get_tracer("test")
    for index in range(count):
        tracer.start_span(f"span-{index}").end()


def test_a_full_queue_drops_spans_and_counts_them_without_waiting() -> None:
    metrics = Metrics()
    hanging = HangingExporter()
    processor = otel.BoundedSpanProcessor(hanging, metrics, capacity=4, schedule_delay_millis=10)
    started = time.monotonic()
    ended_spans(processor, 100)
    assert time.monotonic() - started < 5, "ending spans never waits for the collector"
    # At most one batch is in the hung export and at most a queue's worth waits.
    dropped = metrics.registry.get_sample_value("jwtlet_trace_spans_dropped_total", {"reason": "queue_full"})
    assert dropped is not None and dropped >= 100 - 4 - 4
    assert processor.waiting <= 4
    hanging.release.set()
    processor.shutdown()
    failed = metrics.registry.get_sample_value("jwtlet_trace_spans_dropped_total", {"reason": "export_failed"})
    assert failed is not None and failed + dropped + processor.waiting == 100
    assert b"jwtlet_trace_spans_dropped_total" in metrics.exposition()


def test_an_export_the_collector_refused_is_counted_as_dropped() -> None:
    metrics = Metrics()

    class Refusing(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.FAILURE

    processor = otel.BoundedSpanProcessor(Refusing(), metrics, capacity=64)
    ended_spans(processor, 3)
    processor.force_flush()
    assert metrics.registry.get_sample_value(
        "jwtlet_trace_spans_dropped_total", {"reason": "export_failed"}) == 3
    assert processor.waiting == 0
    processor.shutdown()


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
    exporter = otel.OTLPSpanExporter(endpoint=silent_collector + otel.TRACES_PATH, timeout=30)
    processor = otel.BoundedSpanProcessor(exporter, metrics, capacity=16, schedule_delay_millis=1)
    tracer = otel.OtelTracing(otel.provider_for(TracingConfig(enabled=True), processor))
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
    assert (metrics.registry.get_sample_value("jwtlet_trace_spans_dropped_total", {"reason": "queue_full"})
            or 0) > 0
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

    def callLater(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Twisted's name
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callFromThread(self, function: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.clock.callLater(0, function, *args)


def test_the_daemon_installs_its_tracer_while_it_runs_and_flushes_on_stop() -> None:
    installed = recorder()
    clock = Clock()
    service = TracingService(installed.tracer, ThreadedClock(clock))
    assert tracing.current() is tracing.OFF
    service.startService()
    assert tracing.current() is installed.tracer
    with tracing.current().span("work"):
        pass
    stopping = service.stopService()
    for _ in range(100):
        if stopping.called:
            break
        time.sleep(0.01)  # the flush runs in its own thread
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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)  # noqa: S603
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
    assert otel.collector_endpoint(written.tracing, {}) == "https://otel.example:4318/v1/traces"
    assert otel.collector_endpoint(config.tracing, {}) == "http://127.0.0.1:4318/v1/traces"
    # The standard variables name the collector when the config does not.
    assert otel.collector_endpoint(config.tracing, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None


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
    assert server.kind is SpanKind.SERVER and server.parent is not None and server.context is not None
    assert (f"{server.context.trace_id:032x}", f"{server.parent.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert (server.attributes or {})[tracing.CLIENT_ATTRIBUTE] == WORKLOAD.username
    assert (server.attributes or {})["rpc.system"] == "grpc"
    assert children(recording.spans(), server) == ["validate"]
    assert (recording.named("validate").attributes or {})[tracing.VALIDATOR_ATTRIBUTE] == "kubernetes-oidc"
    everything = json.dumps([span.to_json() for span in recording.spans()])
    assert "token-web" not in everything and "target-token" not in everything
