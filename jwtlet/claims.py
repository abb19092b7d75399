"""
Claims from the caller (claims.md): a resource mapping's ``condition`` and
the ``claimExpressions`` of mappings and scopes, in CEL, and the merge of
every source of claims with its conflicts.

Expressions are compiled once per source text — when a mapping or scope is
written (:func:`check_condition`, :func:`check_expression`), or on first use
after it is loaded — and the programs are kept (:func:`compiled`), so no
exchange compiles.  Evaluation is pure and fails closed.  This module says
what went wrong (:class:`RuleFailed`, :class:`ClaimConflict`);
:mod:`jwtlet.policy` turns that into the refusal a client sees.
"""

from __future__ import annotations

import datetime
import functools
from typing import Iterable, Mapping, Optional, Sequence, Union

import attrs
from cachetools import LRUCache

from jwtlet import cel, jsonout
from jwtlet.cel import CelCompileError, CelEvaluationError, Expression
from jwtlet.model import Identity, JSONObject, JSONValue, ResourceMapping, ScopeMapping

#: The top-level names an expression may read (claims.md, "What an expression sees").
VARIABLES = frozenset({"subject", "request", "now"})

#: Compiled programs kept, by source.  Far more than the expressions of any
#: real set of mappings; beyond it the least recently used is compiled again.
COMPILED_EXPRESSIONS = 16_384

#: Memory for activations kept for callers seen again (the validators keep
#: an identity while its token is cached, so a workload's next exchange finds
#: its own): about 2,000 callers with a Kubernetes token's claims, fewer with
#: larger ones; the least recently used goes first.
PREPARED_BYTES = 32 * 1024 * 1024

#: Where a mapping's own expressions are named in conflicts and logs.
MAPPING_EXPRESSIONS = "claimExpressions"

#: One source of claims: who gives them (for conflict messages) and what.
Layer = tuple[str, Mapping[str, JSONValue]]


@attrs.define(auto_exc=True)
class RuleFailed(Exception):
    """
    A rule of the mapping refused the caller.  ``rule`` names the expression
    (``condition``, ``claimExpressions.pod``, ``scope 'read' claimExpressions.team``);
    ``outcome`` is ``false`` (the condition does not hold), ``failed`` (an
    evaluation error or a result that is not JSON) or ``invalid`` (the stored
    expression no longer compiles; ``reason`` is what the checker said).
    Nothing here ever quotes a value of the caller's credential.
    """

    rule: str
    outcome: str
    reason: str = ""


@attrs.define(auto_exc=True)
class ClaimConflict(Exception):
    """Two sources give one claim different values."""

    claim: str
    first: str
    second: str

    def __str__(self) -> str:
        return f"{self.first} and {self.second} give claim '{self.claim}' different values"


# -- compiling ------------------------------------------------------------------


@functools.lru_cache(maxsize=COMPILED_EXPRESSIONS)
def compiled(source: str) -> Union[Expression, CelCompileError]:
    """
    The program of ``source``, compiled on its first use only.  A source that
    does not compile is remembered as its error, so a broken stored mapping
    is not compiled again by every exchange that reaches it.
    """
    try:
        return cel.compile_expression(source, VARIABLES)
    except CelCompileError as error:
        return error


def _checked(field: str, source: JSONValue) -> Expression:
    if not isinstance(source, str):
        raise ValueError(f"{field}: must be a string holding a CEL expression")
    program = compiled(source)
    if isinstance(program, CelCompileError):
        raise ValueError(f"{field}: {program}")
    return program


def check_expression(field: str, source: JSONValue) -> str:
    """A claim expression as written: its source, or ``ValueError("<field>: <what the CEL checker said>")``."""
    return _checked(field, source).source


def check_condition(source: JSONValue, field: str = "condition") -> str:
    """
    A condition as written.  The CEL package declares no variable types, so
    its checker cannot type an expression; a condition is evaluated against a
    caller with every field empty instead, and refused if that gives anything
    but a bool.  One that fails there (it reads a key the empty caller lacks)
    can only be typed by an exchange, where a non-bool fails closed.
    """
    program = _checked(field, source)
    try:
        value = cel.evaluate(program, _EMPTY_CALLER)
    except CelEvaluationError:
        return program.source
    if not isinstance(value, bool):
        raise ValueError(f"{field}: evaluates to {_json_type(value)}, not bool")
    return program.source


def _json_type(value: JSONValue) -> str:
    names = {str: "string", int: "int", float: "double", list: "list", dict: "map"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -- what an expression sees -------------------------------------------------------


def string_lists(extra: Mapping[str, JSONValue]) -> dict[str, list[str]]:
    """
    ``extra`` as map(string, list(string)) (TokenReview's shape); entries of
    any other shape, which a plugin's validator might hand over, are left out.
    """
    return {
        key: list(values)
        for key, values in extra.items()
        if isinstance(key, str) and isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values)
    }


def variables(
    subject: Identity, resource: str, scopes: Sequence[str], audiences: Sequence[str], now: Optional[float]
) -> dict[str, object]:
    """
    The variables of claims.md for one exchange.  Without a clock there is
    no ``now``: an expression reading it fails, and so refuses.
    """
    found: dict[str, object] = {
        "subject": {
            "username": subject.username,
            "namespace": subject.namespace or "",
            "serviceAccount": subject.name or "",
            "uid": subject.uid or "",
            "issuer": subject.issuer,
            "claims": dict(subject.claims),
            "extra": string_lists(subject.extra),
        },
        "request": {"resource": resource, "scopes": list(scopes), "audiences": list(audiences)},
    }
    if now is not None:
        found["now"] = _timestamp(now)
    return found


def _timestamp(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, datetime.UTC)


_EMPTY_CALLER = cel.prepare(variables(Identity(username="", issuer=""), "", (), (), 0.0))


_PreparedKey = tuple[int, str, tuple[str, ...], tuple[str, ...]]


@attrs.define
class _Clock:
    """
    ``now`` of a kept activation, handed to CEL by a resolver when an
    expression reads it.  Setting a variable of an activation would discard
    the CEL environment the package builds from it on first use (about 4 µs
    to build again, against 0.5 µs to evaluate); a resolver leaves it alone.
    """

    seconds: Optional[float] = None

    def resolve(self, name: str) -> object:
        # ``None`` falls through to the activation's own variables, which
        # hold no ``now``: without a clock an expression reading it fails.
        if name == "now" and self.seconds is not None:
            return _timestamp(self.seconds)
        return None


@attrs.frozen
class _Prepared:
    #: kept so that its ``id`` cannot be reused while the entry lives
    subject: Identity
    activation: object
    clock: _Clock
    #: about the memory it holds, see :func:`_size`
    size: int
    #: Values already computed here, by source, of expressions that do not
    #: read ``now``: evaluation is pure and nothing else in the activation
    #: changes, so such a value is the same at every exchange of this caller.
    known: dict[str, JSONValue] = attrs.field(factory=dict)


# Handing values to the CEL package costs microseconds per value, and a
# subject's claims are dozens of them: far more than evaluating.  So an
# activation is kept per (identity object, request) and only the clock is
# set again.  An exchange sets the clock and evaluates without yielding, so
# no other exchange sees the activation in between.
_prepared: LRUCache[_PreparedKey, _Prepared] = LRUCache(PREPARED_BYTES, getsizeof=lambda kept: kept.size)


def _size(seen: Mapping[str, object]) -> int:
    """
    About the memory an activation holds once evaluated: the CEL package's
    environment (~12 KiB) and the converted variables (a few times their
    JSON).  Measured only when one is prepared, never on the hot path.
    """
    return 16 * 1024 + 4 * len(jsonout.text(seen))  # type: ignore[arg-type]  # the variables are JSON values

#: Values kept per caller: far more than the expressions of one mapping and
#: its scopes; past it (a mapping rewritten again and again) nothing more is kept.
KNOWN_VALUES = 64

_UNKNOWN = object()


@attrs.define
class Caller:
    """
    What the expressions of one exchange see, prepared on first need: an
    exchange whose mapping and scopes hold no expression never pays for it.
    """

    subject: Identity
    resource: str
    scopes: Sequence[str]
    audiences: Sequence[str]
    now: Optional[float]
    #: Whether the activation may be kept for the caller's next exchanges
    #: (not for an exchange already refused).
    keep: bool = True

    _prepared: Optional[_Prepared] = attrs.field(default=None, init=False)

    def value(self, rule: str, source: str) -> JSONValue:
        """
        What the expression ``source`` gives this caller, or
        :class:`RuleFailed` naming ``rule``.  A scalar value of an expression
        that does not read ``now`` is kept with the caller's activation and
        not computed again.
        """
        prepared = self._prepare()
        known = prepared.known.get(source, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]  # only JSON values are kept
        program = _program(rule, source)
        try:
            value = cel.evaluate(program, prepared.activation)
        except CelEvaluationError:
            raise RuleFailed(rule, "failed") from None
        if "now" not in program.variables and _scalar(value) and len(prepared.known) < KNOWN_VALUES:
            prepared.known[source] = value
        return value

    def _prepare(self) -> _Prepared:
        if self._prepared is None:
            key = (id(self.subject), self.resource, tuple(self.scopes), tuple(self.audiences))
            kept = _prepared.get(key)
            if kept is None or kept.subject is not self.subject:
                clock = _Clock()
                seen = variables(self.subject, self.resource, self.scopes, self.audiences, None)
                kept = _Prepared(self.subject, cel.prepare(seen, clock.resolve), clock, _size(seen))
                if self.keep and kept.size <= PREPARED_BYTES:
                    _prepared[key] = kept
            kept.clock.seconds = self.now
            self._prepared = kept
        return self._prepared


def _scalar(value: JSONValue) -> bool:
    # Lists and objects are not kept: the claims of a token must never share
    # a value another token's claims could change.
    return value is None or isinstance(value, (str, int, float, bool))


# -- evaluating ---------------------------------------------------------------------


def _program(rule: str, source: str) -> Expression:
    program = compiled(source)
    if isinstance(program, CelCompileError):
        raise RuleFailed(rule, "invalid", str(program))
    return program


def require_condition(mapping: ResourceMapping, caller: Caller) -> None:
    """The mapping applies only when its condition is ``true``; else :class:`RuleFailed`."""
    if mapping.condition is None:
        return
    holds = caller.value("condition", mapping.condition)
    if not isinstance(holds, bool):
        raise RuleFailed("condition", "failed")
    if not holds:
        raise RuleFailed("condition", "false")


def evaluate_claims(
    rule: str, expressions: Mapping[str, str], caller: Caller, reserved: frozenset[str]
) -> JSONObject:
    """
    The claims ``expressions`` compute for ``caller``.  A reserved name is
    never evaluated, so it can never be produced, whatever a store holds.
    """
    claims: JSONObject = {}
    for name in sorted(expressions):
        if name in reserved:
            continue
        claims[name] = caller.value(f"{rule}.{name}", expressions[name])
    return claims


def static_layers(requested: Iterable[str], scope_mappings: Mapping[str, ScopeMapping]) -> list[Layer]:
    """The static claims of the requested scopes that have a scope mapping, by scope name."""
    return [
        (f"scope '{name}'", scope_mappings[name].claims)
        for name in sorted(set(requested))
        if name in scope_mappings
    ]


def expression_layers(
    requested: Iterable[str],
    scope_mappings: Mapping[str, ScopeMapping],
    mapping: ResourceMapping,
    caller: Caller,
    reserved: frozenset[str],
) -> list[Layer]:
    """The scopes' claim expressions, by scope name, then the mapping's (claims.md's order)."""
    layers: list[Layer] = []
    for name in sorted(set(requested)):
        scope = scope_mappings.get(name)
        if scope is not None and scope.claim_expressions:
            rule = f"scope '{name}' {MAPPING_EXPRESSIONS}"
            layers.append((rule, evaluate_claims(rule, scope.claim_expressions, caller, reserved)))
    if mapping.claim_expressions:
        layers.append((
            f"the mapping's {MAPPING_EXPRESSIONS}",
            evaluate_claims(MAPPING_EXPRESSIONS, mapping.claim_expressions, caller, reserved),
        ))
    return layers


def merge(layers: Iterable[Layer], reserved: frozenset[str]) -> JSONObject:
    """
    Every layer's claims in one object; a claim two layers give different
    values is a :class:`ClaimConflict` (the same value twice is fine).
    Reserved names are never taken.
    """
    claims: JSONObject = {}
    origin: dict[str, str] = {}
    for source, given in layers:
        for name, value in given.items():
            if name in reserved:
                continue
            if name in claims and claims[name] != value:
                raise ClaimConflict(name, origin[name], source)
            claims[name] = value
            origin.setdefault(name, source)
    return claims
