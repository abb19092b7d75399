"""
Export off the request path: ended spans wait in a bounded queue, and a
thread of its own takes them in batches to the collector.

Adding a span is one ``deque.append`` on the thread that ended it (the
reactor's, or a gRPC worker's): no lock, no wake-up unless a whole batch
is waiting.  A collector that is down or slow holds up only the export
thread; meanwhile the queue fills, and spans that find it full are dropped
and counted (``jwtlet_trace_spans_dropped_total{reason="queue_full"}``), as
are those of a batch the collector did not take (``reason="export_failed"``).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Sequence

from twisted.logger import Logger

from jwtlet.metrics import Metrics
from jwtlet.tracing.spans import Finished

log = Logger(namespace="jwtlet.tracing")

MAX_QUEUED_SPANS = 2048
MAX_EXPORT_BATCH = 512
SCHEDULE_DELAY_SECS = 1.0

#: Sends one batch; ``True`` when the collector took it.
Send = Callable[[Sequence[Finished]], bool]


class ExportQueue:
    """
    At most ``capacity`` spans wait; the export thread sends them every
    ``delay`` seconds, or as soon as ``batch`` of them wait, at most
    ``batch`` per call of ``send``.  (Threads ending spans at once may
    overshoot ``capacity`` by one span each: the check and the append are
    not one step, and a lock on every span would cost more than the bound
    is worth.)
    """

    def __init__(self, send: Send, metrics: Metrics, capacity: int = MAX_QUEUED_SPANS,
                 delay: float = SCHEDULE_DELAY_SECS, batch: int = MAX_EXPORT_BATCH):
        self.send = send
        self.capacity = capacity
        self.delay = delay
        self.batch = min(batch, capacity)
        self.queue_full = metrics.trace_spans_dropped.labels("queue_full")
        self.export_failed = metrics.trace_spans_dropped.labels("export_failed")
        self.pending: deque[Finished] = deque()
        self.wake = threading.Event()
        self.stopping = False
        #: One export at a time: the thread's, or a caller's flush.
        self.exporting = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="jwtlet-trace-export", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        """Spans queued and not yet taken for export."""
        return len(self.pending)

    def add(self, span: Finished) -> None:
        """Queue an ended span, or drop and count it when the queue is full; never waits."""
        pending = self.pending
        if len(pending) >= self.capacity:
            self.queue_full.inc()
            return
        pending.append(span)
        if len(pending) >= self.batch and not self.wake.is_set():
            self.wake.set()

    def flush(self, whole_batches: bool = False) -> None:
        """
        Send the spans queued so far (with ``whole_batches``, only as many
        as fill whole batches) in the calling thread, which waits for the
        collector.
        """
        least = self.batch if whole_batches else 1
        with self.exporting:
            while len(self.pending) >= least:
                count = min(len(self.pending), self.batch)
                taken = [self.pending.popleft() for _ in range(count)]
                if not self._sent(taken):
                    self.export_failed.inc(count)

    def shutdown(self) -> None:
        """Stop the export thread after it sent what is queued; blocks while the collector keeps it."""
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def _sent(self, spans: Sequence[Finished]) -> bool:
        try:
            return self.send(spans)
        except Exception:
            log.failure("exporting {count} spans failed", count=len(spans))
            return False

    def _run(self) -> None:
        while not self.stopping:
            # Woken by a whole batch: whole batches only, the rest waits for
            # the next; at the end of a delay: everything.
            woken = self.wake.wait(self.delay)
            self.wake.clear()
            self.flush(whole_batches=woken and not self.stopping)
        self.flush()
