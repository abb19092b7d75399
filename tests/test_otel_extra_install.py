"""
``pip install 'jwtlet[otel]'`` in one command gives a working exporter
(issue 18): jwtlet no longer depends on xds-protos, whose old copy of
OpenTelemetry's protos could replace opentelemetry-proto's and break the OTLP
exporter.  The wheel is built and installed with the extra into a fresh
venv, which then imports the exporter and the ext_authz messages and
exports one span to a receiver here.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from otlp_receiver import Receiver

REPO = Path(__file__).resolve().parent.parent

IN_THE_VENV = """
import sys
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from jwtlet.extauthz.grpc_server import check_response
from jwtlet.extauthz.decide import Decision
from jwtlet.config.schema import TracingConfig
from jwtlet.metrics import Metrics
from jwtlet import tracing

assert check_response(Decision.allow("t")).ok_response.headers[0].header.key == "authorization"
tracer = tracing.build(TracingConfig(enabled=True, endpoint=sys.argv[1], service_name="fresh-venv"), Metrics())
with tracer.span("installed"):
    pass
tracer.shutdown()()
"""


@pytest.mark.slow
def test_the_otel_extra_installs_in_one_command_and_exports_a_span(tmp_path: Path) -> None:
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("jwtlet-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = subprocess.run(  # noqa: S603
        [str(python), "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[otel]"],
        capture_output=True, text=True, timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, timeout=60)  # noqa: S603
    assert "xds-protos" not in listed.stdout, "the package whose OpenTelemetry copy clashes is back"
    with Receiver() as receiver:
        ran = subprocess.run(  # noqa: S603
            [str(python), "-c", IN_THE_VENV, receiver.url], capture_output=True, text=True, timeout=120,
            cwd=tmp_path,  # not the repository: the installed wheel must be what is imported
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        spans = receiver.wait_for(lambda spans: bool(spans), timeout=10)
    assert [(span.name, span.service) for span in spans] == [("installed", "fresh-venv")]
    assert receiver.paths == ["/v1/traces"]


def test_the_generated_envoy_messages_are_xds_protos_own_where_both_are_present() -> None:
    """
    The generated modules register the very files xds-protos does (same
    names, same descriptors), so Envoy speaks to them as to xds-protos'.
    Compared only where xds-protos happens to be installed (never in the
    project's own environments, see scripts/generate_envoy_api.py).
    """
    upstream = pytest.importorskip("envoy.service.auth.v3.external_auth_pb2")
    from google.protobuf import descriptor_pb2

    from jwtlet.extauthz.envoy_api import envoy_service_auth_v3_external_auth_pb2 as ours

    def serialized(module: object) -> bytes:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
        return proto.SerializeToString()

    assert ours.DESCRIPTOR.name == "envoy/service/auth/v3/external_auth.proto"
    assert serialized(ours) == serialized(upstream)
