"""
Run the real daemon (``twistd -n jwtlet``) as a subprocess for end-to-end
tests: free ports, JSON log lines read as they come, stop with a signal.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Sequence

import attrs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def bin_path(name: str) -> str:
    """A console script installed beside the running interpreter."""
    return str(Path(sys.executable).with_name(name))


def _pump(stream: IO[str], lines: queue.Queue[tuple[str, str]], name: str, keep: list[str]) -> None:
    for line in stream:
        keep.append(line)
        lines.put((name, line))
    lines.put((name, ""))


@attrs.define
class DaemonProcess:
    """A running ``twistd -n --pidfile= jwtlet ...``."""

    process: subprocess.Popen[str]
    token_port: int
    management_port: int
    _lines: queue.Queue[tuple[str, str]]
    stdout: list[str]
    stderr: list[str]

    @classmethod
    def start(
        cls,
        arguments: Sequence[str],
        cwd: Path,
        env: Optional[Mapping[str, str]] = None,
        token_port: Optional[int] = None,
        management_port: Optional[int] = None,
    ) -> DaemonProcess:
        token_port = token_port or free_port()
        management_port = management_port or free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("JWTLET")}
        environment.update(
            JWTLET__TOKEN_EXCHANGE_PORT=str(token_port),
            JWTLET__MANAGEMENT_PORT=str(management_port),
        )
        environment.update(env or {})
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and daemon
            [bin_path("twistd"), "-n", "--pidfile=", "jwtlet", *arguments],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[tuple[str, str]] = queue.Queue()
        stdout: list[str] = []
        stderr: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        for name, stream, keep in (("stdout", process.stdout, stdout), ("stderr", process.stderr, stderr)):
            threading.Thread(target=_pump, args=(stream, lines, name, keep), daemon=True).start()
        return cls(process, token_port, management_port, lines, stdout, stderr)

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.token_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        parsed = []
        for line in list(self.stdout):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        return parsed

    def wait_for(self, predicate: Callable[[str, str], bool], timeout: float = 30.0) -> str:
        """Wait (bounded) for an output line matching ``predicate(stream, line)``."""
        closed = set()
        deadline = time.monotonic() + timeout
        while True:
            try:
                name, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching output in {timeout}s: {self.output()}") from None
            if line == "":
                closed.add(name)
                if len(closed) == 2:
                    raise AssertionError(f"the daemon exited: {self.output()}")
                continue
            if predicate(name, line):
                return line

    def wait_event(
        self, name: str, where: Callable[[dict[str, Any]], bool] = lambda event: True, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait (bounded) for the next JSON log line whose ``event`` is ``name`` and that ``where`` accepts."""

        def matches(stream: str, line: str) -> bool:
            try:
                event = json.loads(line)
            except ValueError:
                return False
            return isinstance(event, dict) and event.get("event") == name and where(event)

        found: dict[str, Any] = json.loads(self.wait_for(matches, timeout))
        return found

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until both sites accept connections, whatever the log level."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.process.returncode}: {self.output()}")
            if all(_accepts(port) for port in (self.token_port, self.management_port)):
                return
            pause.wait(0.05)
        raise AssertionError(f"the daemon did not listen within {timeout}s: {self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and return the exit status (negative: killed by a signal)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the daemon did not exit within {timeout}s") from None

    def output(self) -> str:
        return "".join(self.stdout[-40:]) + "".join(self.stderr[-40:])
