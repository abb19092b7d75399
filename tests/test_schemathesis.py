"""
schemathesis against the running daemon (``--dev``, as a subprocess), from
the OpenAPI documents, with a bounded number of examples per operation: no
5xx, every status code, content type and body as documented.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from jwtlet.daemon import dev as devissuer
from jwtlet.testing.process import DaemonProcess, bin_path

pytestmark = pytest.mark.slow
OPENAPI = Path(__file__).resolve().parent.parent / "openapi"
EXAMPLES_PER_OPERATION = "15"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    work = tmp_path_factory.mktemp("schemathesis")
    process = DaemonProcess.start(["--dev", "--data-dir", str(work / "data")], cwd=work)
    process.wait_listening()
    yield process, work / "data"
    process.stop(signal.SIGTERM)


@pytest.mark.parametrize("document", ["token-exchange.yaml", "management.yaml"])
def test_the_documents_hold_for_generated_requests(daemon: tuple[DaemonProcess, Path], document: str) -> None:
    process, data = daemon
    url = process.token_url if document.startswith("token") else process.management_url
    admin = devissuer.mint(data, "jwtlet", "admin", int(time.time()))
    result = subprocess.run(  # noqa: S603
        [bin_path("st"), "run", str(OPENAPI / document), "--url", url, "--max-examples", EXAMPLES_PER_OPERATION,
         "--seed", "20261124", "--request-timeout", "10", "--no-color",
         # A well-formed request may still be refused (a syntactically valid but unknown token, say).
         "--exclude-checks", "positive_data_acceptance",
         "--header", f"Authorization: Bearer {admin}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Server error" not in result.stdout
    assert "Traceback" not in process.output()
