"""
Attacks on the daemon's input and resource limits, each written as what the
attacker does and what must happen: huge uploads (announced or chunked) to
every port, multipart and oddly nested form bodies, and connection floods.
The uploads and floods go to a real ``twistd -n jwtlet --dev`` over loopback,
because what matters there (memory, the reactor staying responsive, what a
client receives) only shows in a real process.
"""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from apps import ADMIN, WORKLOAD, Apps, Reply, call, make_apps

from jwtlet import policy
from jwtlet.model import ResourceMapping
from jwtlet.testing.process import DaemonProcess

URL = "http://jwtlet.test"
FORM = "application/x-www-form-urlencoded"
EIGHT_MIB = 8 << 20
PIECE = 64 * 1024
# The spec's own bounds (security.md), not tuned to this machine.
RSS_GROWTH_LIMIT = 16 << 20
HEALTH_LIMIT_SECS = 0.2
# "At once": the answer comes on the headers or the first 64 KiB, in
# milliseconds; the bound is generous for a shared, busy test machine.
PROMPT_SECS = 3.0


# -- a raw attacking client ---------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def upload(port: int, path: str, size: int, chunked: bool = False, pause: float = 0.0,
           content_type: str = FORM, stop: Optional[threading.Event] = None) -> tuple[int, Any, float]:
    """
    POST ``size`` bytes of form body to ``path`` as fast as the daemon takes
    them (or one piece every ``pause`` seconds, the trickling attacker's pace,
    cut short when ``stop`` is set), stopping as soon as an answer arrives, as
    a client that reads while it sends does.  Returns the status, the JSON
    body and the seconds from the first byte to the answer.
    """
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n\r\n").encode()
    # Many small fields: the costliest shape for a server that parses the form itself.
    body = b"a=x&" * (PIECE // 4)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head)
        sent = 0
        while sent < size:
            readable, writable, _ = select.select([connection], [connection], [], 10)
            if readable:
                break
            if writable:
                piece = body[: min(PIECE, size - sent)]
                try:
                    connection.sendall(chunk(piece) if chunked else piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(piece)
                if pause and (stop or threading.Event()).wait(pause):
                    break
        else:
            if chunked:
                connection.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        answered = time.monotonic() - started
        content = response.read()
    return response.status, json.loads(content) if content else None, answered


def get(port: int, path: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        connection.close()


def rss(pid: int) -> int:
    """The resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def start(tmp_path: Path, env: Optional[dict[str, str]] = None) -> DaemonProcess:
    daemon = DaemonProcess.start(["--dev", "--data-dir", str(tmp_path / "data")], cwd=tmp_path, env=env)
    daemon.wait_listening()
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    running = start(tmp_path_factory.mktemp("limits"))
    yield running
    running.stop(signal.SIGKILL)


def targets(daemon: DaemonProcess) -> list[tuple[int, str]]:
    """One route of each limit: the token endpoint, a management route, Envoy's ext_authz prefix."""
    return [(daemon.token_port, "/token"), (daemon.management_port, "/api/v1/scopes"),
            (daemon.token_port, "/ext_authz/x")]


# -- huge uploads against the real daemon -------------------------------------


@pytest.mark.slow
def test_an_8_mib_post_to_any_port_is_refused_at_once_without_growing_the_daemon(
    daemon: DaemonProcess,
) -> None:
    """
    The attacker POSTs 8 MiB of form body, with its length announced and
    chunked, to a route of every limit: each gets 413 with a JSON error
    promptly, and the daemon's memory grows by less than 16 MiB in all.
    """
    for port, path in targets(daemon):  # warm up: code paths imported, buffers allocated
        upload(port, path, 128 * 1024)
    before = rss(daemon.process.pid)
    for port, path in targets(daemon):
        for chunked in (False, True):
            status, body, seconds = upload(port, path, EIGHT_MIB, chunked=chunked)
            framing = "chunked" if chunked else "announced"
            assert (status, body) == (413, {"error": "request_too_large"}), (path, framing)
            assert seconds < PROMPT_SECS, (path, framing, seconds)
    grown = rss(daemon.process.pid) - before
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew by {grown >> 10} KiB"


@pytest.mark.slow
def test_ext_authz_checks_carry_no_body(daemon: DaemonProcess) -> None:
    """Envoy sends none: a single body byte to the ext_authz prefix is refused, whatever serves it."""
    status, body, _ = upload(daemon.token_port, "/ext_authz/x", 1)
    assert (status, body) == (413, {"error": "request_too_large"})


@pytest.mark.slow
def test_health_keeps_answering_while_uploads_go_on(daemon: DaemonProcess) -> None:
    """
    While one attacker floods 8 MiB uploads and another trickles a form body,
    ``/health`` on both ports answers every probe in under 200 ms.
    """
    stop = threading.Event()
    uploaded = threading.Event()
    problems: list[BaseException] = []

    def flood() -> None:
        try:
            while not stop.is_set():
                for port, path in targets(daemon):
                    upload(port, path, EIGHT_MIB, chunked=not stop.is_set())
                    uploaded.set()
        except BaseException as error:  # reported by the main thread
            problems.append(error)

    def trickle() -> None:
        try:
            while not stop.is_set():
                upload(daemon.token_port, "/token", 16 * 1024, pause=0.5, stop=stop)
        except BaseException as error:
            problems.append(error)

    attackers = [threading.Thread(target=flood), threading.Thread(target=trickle)]
    for attacker in attackers:
        attacker.start()
    try:
        slowest = 0.0
        for _ in range(20):
            # One probe round per 8 MiB upload the flood got through: every round meets the attack.
            assert uploaded.wait(30), "the flood made no progress"
            uploaded.clear()
            for port in (daemon.token_port, daemon.management_port):
                status, text, seconds = get(port, "/health")
                assert (status, text) == (200, b"OK")
                slowest = max(slowest, seconds)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(30)
    assert not problems, problems
    assert slowest < HEALTH_LIMIT_SECS, f"/health took {slowest:.3f}s"


# -- connection floods against the real daemon --------------------------------


def is_closed_at_once(connection: socket.socket) -> bool:
    """The daemon closed this connection without a word (nothing to read but the end)."""
    connection.settimeout(2)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def release(connection: socket.socket) -> None:
    """
    Ask the daemon to close a held connection, and wait for its end: the
    daemon closes the socket and forgets the connection in one step, so once
    the end is read the slot is free (no waiting for it to notice a close).
    """
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    response = http.client.HTTPResponse(connection)
    response.begin()
    assert response.read() == b"OK"
    while connection.recv(4096):
        pass
    connection.close()


def holds(port: int) -> socket.socket:
    """A kept-alive connection the daemon has served once, so it is surely counted."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = http.client.HTTPResponse(connection)
    response.begin()
    assert response.read() == b"OK"
    return connection


@pytest.mark.slow
def test_past_max_connections_a_new_connection_is_closed_at_once(tmp_path: Path) -> None:
    """
    The attacker opens ``limits.max_connections`` connections to a port and
    holds them: the next one is closed at once, the other port still serves,
    and once one held connection closes a new client is served again.
    """
    limit = 4
    daemon = start(tmp_path, {"JWTLET__LIMITS__MAX_CONNECTIONS": str(limit)})
    held = [holds(daemon.token_port) for _ in range(limit)]
    try:
        with socket.create_connection(("127.0.0.1", daemon.token_port), timeout=5) as extra:
            assert is_closed_at_once(extra)
        assert get(daemon.management_port, "/health")[:2] == (200, b"OK"), "each port has its own cap"
        release(held.pop())
        assert get(daemon.token_port, "/health")[:2] == (200, b"OK")
    finally:
        for connection in held:
            connection.close()
        daemon.stop(signal.SIGKILL)


# -- odd bodies, in memory through the daemon's own Site ----------------------


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    built = make_apps(tmp_path)
    built.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx"))
    return built


def multipart(boundary: str, fields: dict[str, str]) -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def token_post(apps: Apps, body: bytes, content_type: str) -> Reply:
    return call(apps.token, "POST", f"{URL}/token", data=body, headers={"Content-Type": content_type})


def assert_invalid_request(reply: Reply) -> None:
    assert reply.code == 400, reply.body
    assert reply.header("Content-Type") == "application/json"
    assert reply.json()["error"] == "invalid_request"


EXCHANGE = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload", "resource": "ctx"}


def test_a_well_formed_multipart_exchange_is_invalid_request(apps: Apps) -> None:
    """The attacker sends a valid exchange as multipart: it is not a form body, so 400, not a token."""
    reply = token_post(apps, multipart("b0undary", EXCHANGE), "multipart/form-data; boundary=b0undary")
    assert_invalid_request(reply)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"--x\r\nno headers, no end", "multipart/form-data; boundary=x"),
        (multipart("a", EXCHANGE), "multipart/form-data; boundary=other"),
        (multipart("a", EXCHANGE), "multipart/form-data"),
        (b"\x00\xff" * 100, "multipart/mixed; boundary=\x7f"),
    ],
)
def test_a_malformed_multipart_body_is_a_json_invalid_request(apps: Apps, body: bytes, content_type: str) -> None:
    """Twisted used to parse these itself and answer a bare HTML-less 400; now /token answers in its own shape."""
    assert_invalid_request(token_post(apps, body, content_type))


def test_a_multipart_body_to_the_management_port_is_a_json_error(apps: Apps) -> None:
    reply = call(apps.management, "POST", f"{URL}/api/v1/scopes", data=multipart("b", {"scope": "x"}),
                 headers={"Content-Type": "multipart/form-data; boundary=b",
                          "Authorization": f"Bearer token-{ADMIN.name}"})
    assert 400 <= reply.code < 500
    assert reply.header("Content-Type") == "application/json"
    assert "error" in reply.json()


def test_deeply_nested_form_names_and_values_are_plain_strings(apps: Apps) -> None:
    """
    The attacker sends PHP/Rails-style nested names and a deeply bracketed
    value: no structure is built from them; the names are unknown parameters
    and the value is just a resource nobody is mapped to.
    """
    nested = "".join(f"[{index}]" for index in range(2000))
    body = f"grant_type={policy.GRANT_TYPE_TOKEN_EXCHANGE}&subject_token=token-workload&resource=ctx"
    reply = token_post(apps, f"{body}&resource{nested}=other&scope[a][b]=admin".encode(), FORM)
    assert reply.code == 200, reply.body
    deep = token_post(apps, f"{body.replace('=ctx', '=' + '[' * 20000)}".encode(), FORM)
    assert (deep.code, deep.json()["error"]) == (403, "unauthorized_client")
