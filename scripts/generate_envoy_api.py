"""
Regenerate ``jwtlet/extauthz/envoy_api/``: the few Envoy API messages the
ext_authz gRPC front uses, generated from the descriptors ``xds-protos``
ships, with nothing else of it.

Why not depend on ``xds-protos``: it also ships an old copy of
``opentelemetry/proto/...``, and installed in one pip command with the
``otel`` extra its files can replace opentelemetry-proto's, so the OTLP
exporter stops importing (issue 18).  jwtlet needs ``envoy.service.auth.v3``
and what it imports, about twenty files.

Run in a scratch venv that has ``xds-protos`` and ``grpcio-tools`` (never in
the project's own environments)::

    python -m venv /tmp/gen && /tmp/gen/bin/pip install xds-protos grpcio-tools
    /tmp/gen/bin/python scripts/generate_envoy_api.py

The descriptors keep their file names (``envoy/service/auth/v3/external_auth.proto``):
a process that also imports ``xds-protos`` of the same Envoy API version
registers identical files, not conflicting ones.  The modules are flattened
into one package (``envoy/config/core/v3/base.proto`` becomes
``envoy_config_core_v3_base_pb2``) and their imports rewritten to match.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2

OUT = Path(__file__).resolve().parent.parent / "jwtlet" / "extauthz" / "envoy_api"
PACKAGE = "jwtlet.extauthz.envoy_api"
#: Shipped by protobuf (google/protobuf) and googleapis-common-protos (google/rpc): depended on, not generated.
PROVIDED = ("google/",)
SERVICE_FILE = "envoy/service/auth/v3/external_auth.proto"
#: Generated code is neither linted nor type-checked; the .pyi stubs give mypy its types.
HEADER = "# ruff: noqa\n# mypy: ignore-errors\n"


def closure() -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file ``external_auth.proto`` needs, dependencies first."""
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(file: object) -> None:
        if file.name in seen:  # type: ignore[attr-defined]
            return
        seen.add(file.name)  # type: ignore[attr-defined]
        for dependency in file.dependencies:  # type: ignore[attr-defined]
            visit(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)  # type: ignore[attr-defined]
        ordered.append(proto)

    visit(external_auth_pb2.DESCRIPTOR)
    return ordered


def module_name(proto_file: str) -> str:
    return proto_file.removesuffix(".proto").replace("/", "_").replace("-", "_")


def rewrite(source: str) -> str:
    """``from envoy.config.core.v3 import base_pb2`` to the flattened module in our package."""

    def flattened(match: re.Match[str]) -> str:
        package, module = match.group("package"), match.group("module")
        if package.startswith("google."):
            return match.group(0)
        stem = module.removesuffix("_pb2").removesuffix("_pb2_grpc")
        suffix = module[len(stem):]
        return f"from {PACKAGE} import {package.replace('.', '_')}_{stem}{suffix}"

    return re.sub(r"^from (?P<package>[\w.]+) import (?P<module>\w+_pb2(?:_grpc)?)\b", flattened, source,
                  flags=re.MULTILINE)


def main() -> int:
    files = closure()
    generated = [proto.name for proto in files if not proto.name.startswith(PROVIDED)]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        descriptor_set = work / "set.pb"
        descriptor_set.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
        base = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={descriptor_set}"]
        subprocess.run([*base, f"--python_out={work}", f"--pyi_out={work}", *generated], check=True)  # noqa: S603
        subprocess.run([*base, f"--grpc_python_out={work}", SERVICE_FILE], check=True)  # noqa: S603
        OUT.mkdir(parents=True, exist_ok=True)
        for old in (*OUT.glob("*_pb2*.py"), *OUT.glob("*_pb2.pyi")):
            old.unlink()
        outputs = ([(name, "_pb2.py") for name in generated] + [(name, "_pb2.pyi") for name in generated]
                   + [(SERVICE_FILE, "_pb2_grpc.py")])
        for name, suffix in outputs:
            source = (work / (name.removesuffix(".proto") + suffix)).read_text()
            (OUT / f"{module_name(name)}{suffix}").write_text(HEADER + rewrite(source))
    print(f"generated {len(outputs)} modules into {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
