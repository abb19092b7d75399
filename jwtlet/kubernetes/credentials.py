"""
What jwtlet presents to an API server (:class:`Credential`): a token in a
file something else rotates, a token written in a kubeconfig, nothing (a
client certificate authenticates), or what a kubeconfig ``exec`` credential
plugin prints (``client.authentication.k8s.io/v1`` and ``v1beta1``), what
EKS (``aws eks get-token``) and GKE (``gke-gcloud-auth-plugin``)
kubeconfigs use.  A plugin runs as a child process, never on the reactor's
time (``spawnProcess``), with the daemon's environment plus its ``env`` and
``KUBERNETES_EXEC_INFO``; its ``ExecCredential`` token is kept until its
``expirationTimestamp`` and fetched again when the API server refuses it.

What a plugin writes is never logged or quoted in an error: it holds the
token.  Its stderr is dropped for the same reason.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Mapping, Optional, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from jwtlet import strictjson
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.outbound import SingleFlight, TokenFile

API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
#: An ExecCredential is a few kilobytes; a plugin that writes more is broken.
MAX_OUTPUT = 1024 * 1024
TIMEOUT_SECS = 30.0


class Credential(Protocol):
    """What jwtlet presents to an API server as ``Authorization: Bearer``, if anything."""

    async def bearer(self, refresh: bool = False) -> Optional[str]:
        """
        The token (``None``: authenticate by client certificate only);
        ``refresh``: the last one was refused, fetch it again.  Raises
        ``OSError``/``ValueError``, or ``DependencyUnavailable``, when there
        is none to be had.
        """


@attrs.frozen
class FileToken:
    """A token in a file something else rotates (the kubelet, a Secret mount)."""

    file: TokenFile

    async def bearer(self, refresh: bool = False) -> Optional[str]:
        return self.file.refused() if refresh else self.file.read()


@attrs.frozen
class InlineToken:
    """A token written in the kubeconfig (``user.token``)."""

    token: str = attrs.field(repr=False)

    async def bearer(self, refresh: bool = False) -> Optional[str]:
        return self.token


@attrs.frozen
class NoToken:
    """A user that authenticates by client certificate alone."""

    async def bearer(self, refresh: bool = False) -> Optional[str]:
        return None


def as_credential(value: TokenFile | Credential) -> Credential:
    """A token file as a :class:`Credential`; anything else as it is."""
    return FileToken(value) if isinstance(value, TokenFile) else value


# -- exec credential plugins ----------------------------------------------------------


def string_field(body: Mapping[str, object], key: str, where: str) -> Optional[str]:
    """A string member of a kubeconfig mapping (empty reads as absent); ``ValueError`` naming it otherwise."""
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key}: must be a string")
    return value


@attrs.frozen
class ExecSpec:
    """A kubeconfig user's ``exec`` section."""

    command: str
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, body: object, where: str, base: Path) -> ExecSpec:
        """
        The section as client-go reads it; a relative command with a path
        separator is taken from the kubeconfig's directory, a bare name from
        ``PATH``.  Raises ``ValueError`` naming what is wrong.
        """
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: must be a mapping")
        command = string_field(body, "command", where)
        if not command:
            raise ValueError(f"{where}.command: required")
        api_version = string_field(body, "apiVersion", where)
        if api_version not in API_VERSIONS:
            raise ValueError(f"{where}.apiVersion: must be {' or '.join(API_VERSIONS)}")
        if string_field(body, "interactiveMode", where) == "Always":
            raise ValueError(f"{where}.interactiveMode: Always needs a terminal, and jwtlet is a daemon")
        args = body.get("args") or []
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise ValueError(f"{where}.args: must be a list of strings")
        env = body.get("env") or []
        if not isinstance(env, list) or not all(
            isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("value"), str)
            for item in env
        ):
            raise ValueError(f"{where}.env: must be a list of {{name, value}} strings")
        if os.sep in command and not Path(command).is_absolute():
            command = str(base / command)
        return cls(command, api_version, tuple(args), tuple((item["name"], item["value"]) for item in env))


def parse_timestamp(text: str) -> float:
    """An RFC 3339 time with its offset (``2026-01-01T12:00:00Z``, ``…-08:00``) as epoch seconds."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("expirationTimestamp has no offset")
    return parsed.timestamp()


def parse_exec_credential(output: bytes, api_version: str) -> tuple[str, Optional[float]]:
    """
    The token of an ``ExecCredential`` and when it expires (``None``: until
    refused).  Raises ``ValueError`` whose message quotes nothing of it.
    """
    document = strictjson.loads(output)
    if not isinstance(document, dict) or document.get("kind") != "ExecCredential":
        raise ValueError("not an ExecCredential")
    if document.get("apiVersion") != api_version:
        raise ValueError(f"an ExecCredential of another apiVersion than {api_version}")
    status = document.get("status")
    token = status.get("token") if isinstance(status, dict) else None
    if not isinstance(token, str) or not token:
        raise ValueError("an ExecCredential without status.token (client certificates from exec plugins "
                         "are not supported)")
    expiry = status.get("expirationTimestamp") if isinstance(status, dict) else None
    if expiry is None:
        return token, None
    if not isinstance(expiry, str):
        raise ValueError("status.expirationTimestamp is not a string")
    return token, parse_timestamp(expiry)


class _Output(ProcessProtocol):
    """Collects stdout up to a bound; ``ended`` fires with the exit code (``None`` when killed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.output = bytearray()
        self.killed: Optional[str] = None
        self.ended: Deferred[Optional[int]] = Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if len(self.output) + len(data) > self.limit:
            self.kill("wrote too much")
            return
        self.output.extend(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        """Dropped: a plugin's diagnostics may quote credentials."""

    def kill(self, why: str) -> None:
        if self.killed is None and self.transport is not None:
            self.killed = why
            self.transport.signalProcess("KILL")
            # Twisted reports the end only once every pipe is closed, and a
            # child the plugin started may hold its stdout open for as long
            # as it likes: close our ends, so the kill ends the wait.
            self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        self.ended.callback(None if self.killed else code)


@attrs.define
class ExecPlugin:
    """
    A :class:`Credential` from an exec plugin.
    Callers asking while the plugin runs wait for that one run.
    """

    spec: ExecSpec
    processes: IReactorProcess
    clock: IReactorTime
    timeout: float = TIMEOUT_SECS
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))
    _token: Optional[str] = attrs.field(default=None, init=False, repr=False)
    _expires_at: Optional[float] = attrs.field(default=None, init=False)
    _running: SingleFlight[str] = attrs.field(factory=SingleFlight, init=False)

    @property
    def name(self) -> str:
        return f"kubeconfig exec plugin {Path(self.spec.command).name}"

    async def bearer(self, refresh: bool = False) -> Optional[str]:
        fresh = self._expires_at is None or self.clock.seconds() < self._expires_at
        if self._token is not None and fresh and not refresh:
            return self._token
        return await self._running(self._run)

    def _environment(self) -> dict[str, str]:
        environment = dict(self.environ)
        environment.update(self.spec.env)
        # What client-go tells a plugin: the kind it must answer, and that nobody is at a terminal.
        environment["KUBERNETES_EXEC_INFO"] = json.dumps(
            {"apiVersion": self.spec.api_version, "kind": "ExecCredential", "spec": {"interactive": False}})
        return environment

    async def _run(self) -> str:
        self._token = None
        output = _Output(MAX_OUTPUT)
        try:
            self.processes.spawnProcess(output, self.spec.command, [self.spec.command, *self.spec.args],
                                        env=self._environment())
        except OSError as error:
            raise DependencyUnavailable(f"{self.name}: cannot start ({error.__class__.__name__})") from None
        timer = self.clock.callLater(self.timeout, output.kill, "timed out")
        try:
            code = await output.ended
        finally:
            if timer.active():
                timer.cancel()
        if output.killed is not None:
            raise DependencyUnavailable(f"{self.name}: {output.killed}")
        if code != 0:
            raise DependencyUnavailable(f"{self.name}: exit status {code}")
        try:
            token, expires_at = parse_exec_credential(bytes(output.output), self.spec.api_version)
        except ValueError as error:
            raise DependencyUnavailable(f"{self.name}: {error}") from None
        self._token, self._expires_at = token, expires_at
        return token
