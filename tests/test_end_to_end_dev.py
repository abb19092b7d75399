"""
The README's first command as a user runs it: ``twistd -n jwtlet --dev`` as a
subprocess, its printed instructions followed over real HTTP, SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import jwt as pyjwt
import pytest

from jwtlet.testing.process import DaemonProcess, bin_path

pytestmark = pytest.mark.slow


def http(method: str, url: str, data: Optional[bytes] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def dev_token(data_dir: Path, account: str) -> str:
    result = subprocess.run(  # noqa: S603
        [bin_path("jwtlet"), "dev-token", account, "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return result.stdout.strip()


@pytest.fixture
def dev_daemon(tmp_path: Path) -> Any:
    data_dir = tmp_path / "data"
    daemon = DaemonProcess.start(["--dev", "--data-dir", str(data_dir)], cwd=tmp_path)
    yield daemon, data_dir
    if daemon.process.poll() is None:
        daemon.stop(signal.SIGKILL)


def test_dev_daemon_follows_its_printed_instructions(dev_daemon: Any) -> None:
    daemon, data_dir = dev_daemon
    instruction = daemon.wait_for(lambda name, line: "jwtlet dev-token default:demo" in line)
    assert str(data_dir) in instruction
    daemon.wait_listening()
    token = dev_token(data_dir, "default:demo")
    form = urllib.parse.urlencode({
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token": token,
        "resource": "demo",
        "scope": "read",
    }).encode()
    status, headers, body = http("POST", f"{daemon.token_url}/token", form,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    issued = json.loads(body)
    assert issued["scope"] == "read"
    _, _, jwks = http("GET", f"{daemon.token_url}/.well-known/jwks.json")
    header = pyjwt.get_unverified_header(issued["access_token"])
    (key,) = [k for k in json.loads(jwks)["keys"] if k["kid"] == header["kid"]]
    claims = pyjwt.decode(issued["access_token"], key=pyjwt.PyJWK.from_dict(key), algorithms=["EdDSA"],
                          audience="jwtlet-dev-service")
    assert (claims["sub"], claims["jwtlet_pc"], claims["role"]) == ("demo", "demo", "reader")
    assert claims["act"]["sub"] == "system:serviceaccount:default:demo"
    assert token not in daemon.output(), "subject tokens never reach the log"
    assert issued["access_token"] not in daemon.output(), "issued tokens never reach the log"

    admin = dev_token(data_dir, "jwtlet:admin")
    status, _, body = http("GET", f"{daemon.management_url}/api/v1/mappings",
                           headers={"Authorization": f"Bearer {admin}"})
    assert status == 200
    assert json.loads(body) == [{"clientIdentifier": "system:serviceaccount:default:demo",
                                 "participantContext": "demo", "scopes": ["read"], "audiences": []}]
    status, _, _ = http("GET", f"{daemon.management_url}/ready")
    assert status == 200

    events = daemon.events()
    assert any(e.get("event") == "token.issued" and e.get("client") == "system:serviceaccount:default:demo"
               for e in events)
    assert all({"time", "level", "event"} <= set(e) for e in events)

    code = daemon.stop(signal.SIGTERM, timeout=10)
    assert code in (0, -signal.SIGTERM)
    assert "Traceback" not in daemon.output()


def test_invalid_config_exits_1_before_opening_ports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: http://example.com\ntoken_exchange_port: 70000\n")
    result = subprocess.run(  # noqa: S603
        [bin_path("twistd"), "-n", "--pidfile=", "jwtlet", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "issuer: must be https" in result.stderr
    assert "token_exchange_port: must be between 1 and 65535" in result.stderr
    assert "token.client_audience: required" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
