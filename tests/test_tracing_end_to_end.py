"""
The running daemon (``twistd -n jwtlet --dev`` as a subprocess) with tracing
on exports its spans over OTLP/HTTP to a small receiver here, which decodes
them with opentelemetry-proto's ``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from otlp_receiver import Receiver

from jwtlet.testing.process import DaemonProcess, bin_path

pytestmark = pytest.mark.slow

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
MESH_SPAN = "b7ad6b7169203331"
SERVER = 2  # Span.SpanKind.SPAN_KIND_SERVER in the OTLP protobuf


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def test_the_running_daemon_exports_each_exchange_as_a_span_tree_inside_the_callers_trace(
    tmp_path: Path, receiver: Receiver
) -> None:
    data_dir = tmp_path / "data"
    daemon = DaemonProcess.start(["--dev", "--data-dir", str(data_dir)], cwd=tmp_path, env={
        "JWTLET__TRACING__ENABLED": "true",
        "JWTLET__TRACING__ENDPOINT": receiver.url,
        "JWTLET__TRACING__SERVICE_NAME": "jwtlet-e2e",
    })
    try:
        daemon.wait_listening(timeout=60)
        token = subprocess.run(  # noqa: S603
            [bin_path("jwtlet"), "dev-token", "default:demo", "--data-dir", str(data_dir)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        form = urllib.parse.urlencode({
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token, "resource": "demo", "scope": "read",
        }).encode()
        request = urllib.request.Request(f"{daemon.token_url}/token", data=form, method="POST", headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "traceparent": f"00-{TRACE_ID}-{MESH_SPAN}-01",
        })
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            issued = json.loads(response.read())["access_token"]
        spans = receiver.wait_for(lambda spans: any(span.name == "POST /token" for span in spans))
    finally:
        daemon.stop(signal.SIGTERM, timeout=15)

    (server,) = [span for span in spans if span.name == "POST /token"]
    assert (server.trace_id, server.parent_span_id, server.kind) == (TRACE_ID, MESH_SPAN, SERVER)
    assert server.service == "jwtlet-e2e"
    assert server.attributes["http.route"] == "/token"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["jwtlet.exchange.outcome"] == "issued"
    assert server.attributes["jwtlet.client"] == "system:serviceaccount:default:demo"
    assert server.attributes["jwtlet.participant_context"] == "demo"
    hops = {span.name: span for span in spans if span.parent_span_id == server.span_id}
    assert set(hops) == {"validate", "store.resolve", "sign"}
    assert hops["validate"].attributes["jwtlet.validator"] == "kubernetes-oidc"
    assert hops["sign"].attributes["jwtlet.signer"] == "local-key"
    everything = repr(spans)
    assert token not in everything and issued not in everything
    assert "Traceback" not in daemon.output()
