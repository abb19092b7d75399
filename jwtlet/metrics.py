"""
Prometheus metrics, one registry per daemon (not the process-global one) so
that tests and several instances in one process do not share counters.
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    exchanges: Counter = attrs.field(init=False)
    exchange_duration: Histogram = attrs.field(init=False)
    signer_duration: Histogram = attrs.field(init=False)
    validator_duration: Histogram = attrs.field(init=False)
    jwks_refresh: Counter = attrs.field(init=False)
    management_requests: Counter = attrs.field(init=False)
    apikey_exchanges: Counter = attrs.field(init=False)
    ext_authz_checks: Counter = attrs.field(init=False)
    ext_authz_cache_hits: Counter = attrs.field(init=False)
    trace_spans_dropped: Counter = attrs.field(init=False)
    _children: dict[tuple[Counter, tuple[str, ...]], Counter] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.exchanges = Counter(
            "jwtlet_exchanges", "Token exchange decisions.", ["outcome", "error"], registry=registry
        )
        self.exchange_duration = Histogram(
            "jwtlet_exchange_duration_seconds", "Time to decide one token exchange.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.signer_duration = Histogram(
            "jwtlet_signer_duration_seconds", "Time the signer took to sign.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.validator_duration = Histogram(
            "jwtlet_validator_duration_seconds", "Time the validator took to decide.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.jwks_refresh = Counter(
            "jwtlet_jwks_refresh", "JWKS fetches from trusted issuers.", ["outcome"], registry=registry
        )
        self.management_requests = Counter(
            "jwtlet_management_requests", "Management API requests.", ["route", "status"],
            registry=registry,
        )
        self.apikey_exchanges = Counter(
            "jwtlet_apikey_exchanges", "API-key exchanges.", ["profile", "outcome"], registry=registry
        )
        self.ext_authz_checks = Counter(
            "jwtlet_ext_authz_checks", "Envoy ext_authz checks.", ["mode", "outcome"], registry=registry
        )
        self.ext_authz_cache_hits = Counter(
            "jwtlet_ext_authz_cache_hits", "ext_authz exchanges served from the cache.", registry=registry
        )
        self.trace_spans_dropped = Counter(
            "jwtlet_trace_spans_dropped", "Spans never delivered to the collector (queue full, export failed).",
            ["reason"], registry=registry,
        )

    def count(self, counter: Counter, *labels: str) -> None:
        """
        One more in ``counter`` for ``labels``, which must come from a closed
        set (outcomes, error codes, configured profiles): the child is kept,
        where finding it through ``labels()`` normalises and locks every time.
        """
        child = self._children.get((counter, labels))
        if child is None:
            child = self._children[(counter, labels)] = counter.labels(*labels)
        child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
