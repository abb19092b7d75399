"""
The exporter process: encoding and posting batches of spans in a Python of
their own, so that neither competes with the reactor for the daemon's GIL.

Measured under the benchmark's load, OTLP encoding and the HTTP post in a
thread of the daemon took a third of what tracing cost (issue 18: at most
15% of throughput); handing a batch over a pipe costs a ``marshal.dumps``.

The export thread (:mod:`jwtlet.tracing.export`) calls :class:`ExporterProcess`
with each batch: it writes the batch to the child's stdin and waits for one
byte back, sent (1) or not (0), so the queue's bound, its drop counts and a
collector that hangs behave as they did in-process.  The child starts with
the first batch, is started again (not sooner than :data:`RESTART_DELAY_SECS`
after the last start) if it dies, and ends when its stdin closes: when the
daemon stops, or dies.

    python -m jwtlet.tracing.exporter     # the child; only ExporterProcess runs it
"""

from __future__ import annotations

import marshal
import os
import signal
import struct
import subprocess
import sys
import time
from typing import IO, Any, Mapping, Optional, Sequence

import attrs

from jwtlet.config.schema import TracingConfig
from jwtlet.metrics import Metrics
from jwtlet.tracing.export import ExportQueue
from jwtlet.tracing.otlp import Collector, Encoder, Sender, collector_for
from jwtlet.tracing.spans import Finished, Recorder

#: A child that died is replaced at most this often: a broken one must not be restarted for every batch.
RESTART_DELAY_SECS = 10.0
#: How long closing waits for the child to send its last batch (it gives up on the collector after its timeout).
STOP_TIMEOUT_SECS = 10.0

SENT, NOT_SENT = b"\x01", b"\x00"
_LENGTH = struct.Struct(">I")
COMMAND = (sys.executable, "-m", "jwtlet.tracing.exporter")


def write_frame(stream: IO[bytes], value: Any) -> None:  # type: ignore[explicit-any]  # marshal's own
    """One value (the settings, a batch) on the pipe: its length, then its ``marshal`` form."""
    data = marshal.dumps(value)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Optional[object]:
    """The next value :func:`write_frame` wrote; ``None`` once the writer closed the pipe."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        return None
    # Only ever what the daemon that started this process wrote: marshal is not for untrusted data.
    return marshal.loads(data)  # noqa: S302


class ExporterProcess:
    """The export thread's way to the collector: a child process that encodes and posts each batch."""

    def __init__(self, collector: Collector, service_name: str, command: Sequence[str] = COMMAND):
        # Through the pipe, not the command line: the headers may hold the collector's credentials.
        self.settings = {"collector": attrs.asdict(collector), "service_name": service_name}
        self.command = list(command)
        self.child: Optional[subprocess.Popen[bytes]] = None
        self.started_at: Optional[float] = None

    def __call__(self, spans: Sequence[Finished]) -> bool:
        child = self._running()
        if child is None:
            return False
        try:
            assert child.stdin is not None and child.stdout is not None
            write_frame(child.stdin, list(spans))
            answer = child.stdout.read(1)
        except (OSError, ValueError):
            answer = b""
        if answer not in (SENT, NOT_SENT):
            self._stop(child)  # died: another starts with a later batch
        return answer == SENT

    def close(self) -> None:
        """Let the child finish its batch and end (its stdin closes), then reap it."""
        if self.child is not None:
            self._stop(self.child)

    def _running(self) -> Optional[subprocess.Popen[bytes]]:
        if self.child is not None and self.child.poll() is None:
            return self.child
        if self.started_at is not None and time.monotonic() - self.started_at < RESTART_DELAY_SECS:
            return None
        self.started_at = time.monotonic()
        try:
            child = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S603
                                     stderr=subprocess.DEVNULL)
            assert child.stdin is not None
            write_frame(child.stdin, self.settings)
        except OSError:
            return None
        self.child = child
        return child

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        self.child = None
        try:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(STOP_TIMEOUT_SECS)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()


def exporting(config: TracingConfig, metrics: Metrics, environ: Optional[Mapping[str, str]] = None) -> Recorder:
    """The daemon's tracer: spans batched to the collector over OTLP/HTTP by the exporter process."""
    process = ExporterProcess(collector_for(config, os.environ if environ is None else environ),
                              config.service_name)
    queue = ExportQueue(process, metrics)

    def stop() -> None:
        queue.shutdown()
        process.close()

    return Recorder(queue.add, config.sample_ratio, stop)


def main() -> int:
    """The child: settings, then batches, on stdin; one byte per batch on stdout."""
    # The daemon decides when this ends (by closing stdin), not a signal to the process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a library prints may mix into the answers
    settings = read_frame(requests)
    if not isinstance(settings, dict):
        return 0
    sender = Sender(Collector(**settings["collector"]), Encoder(settings["service_name"]))
    while True:
        batch = read_frame(requests)
        if batch is None:
            return 0
        sent = sender(batch)  # type: ignore[arg-type]
        answers.write(SENT if sent else NOT_SENT)
        answers.flush()


if __name__ == "__main__":
    raise SystemExit(main())
