"""
Typed adapters around providers, built once where a provider is built.

A provider may answer with a ``Deferred``, a coroutine, another awaitable or a
plain value (plugins.md).  The core should not care: :func:`adapt` wraps each
provider in a :class:`Validator`, :class:`Store` or :class:`Signer` whose
methods return ``Deferred[T]`` with real types, so the exchange, the web ports
and ext_authz just ``await`` them.  An adapter hands a provider's ``Deferred``
through as it is: the hot path pays two plain calls per provider call, and no
allocation.

An adapter provides the provider's interface (``verifyObject`` still holds);
``checks_readiness`` and ``records_token_ids`` say whether the provider also
provides :class:`IReadiness` or :class:`IReplayRecord`, and ``provider`` is the
wrapped object, for what only the daemon asks of it (``IService``).
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable, Literal, Optional, ParamSpec, Sequence, TypeVar, Union, overload

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from zope.interface import implementer

from jwtlet.interfaces import Answer, IMappingStore, IReadiness, IReplayRecord, ISigner, IValidator
from jwtlet.model import ApiKeyRecord, Identity, Integration, JSONObject, Resolution, ResourceMapping, ScopeMapping

T = TypeVar("T")
P = ParamSpec("P")


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def as_deferred(result: Answer[T]) -> Deferred[T]:
    """
    Wrap whatever a provider method returned in a ``Deferred``.

    Any awaitable is driven on the reactor like a coroutine: one that waits on
    Deferreds works, and one that needs an event loop the reactor does not
    run (an asyncio future) fails at once with the error it raises there,
    instead of waiting forever for a loop that never turns.
    """
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    if inspect.isawaitable(result):
        return ensureDeferred(_awaited(result))
    return succeed(result)


def _answer(method: Callable[P, Answer[T]], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
    """
    Call a provider's method; whatever it answers, or raises at once, the
    caller gets a Deferred, so nobody needs to guard both ways.
    """
    try:
        result = method(*args, **kwargs)
    except Exception:
        return fail()
    return as_deferred(result)


@attrs.frozen
class _Adapter:
    """What every adapter shares: the wrapped provider and its optional checks."""

    provider: object

    @property
    def checks_readiness(self) -> bool:
        return IReadiness.providedBy(self.provider)

    def check_ready(self) -> Deferred[None]:
        """Only called when :attr:`checks_readiness`."""
        check: Callable[[], Answer[None]] = self.provider.check_ready  # type: ignore[attr-defined]
        return _answer(check)


@implementer(IValidator)
@attrs.frozen
class Validator(_Adapter):
    provider: IValidator

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        return _answer(self.provider.validate, token, audience)


@implementer(IMappingStore)
@attrs.frozen
class Store(_Adapter):
    provider: IMappingStore

    def add_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return _answer(self.provider.add_mapping, mapping)

    def get_mapping(self, client_identifier: str, participant_context: str) -> Deferred[ResourceMapping]:
        return _answer(self.provider.get_mapping, client_identifier, participant_context)

    def list_mappings(self, client_identifier: Optional[str] = None) -> Deferred[Sequence[ResourceMapping]]:
        return _answer(self.provider.list_mappings, client_identifier)

    def update_mapping(self, mapping: ResourceMapping) -> Deferred[None]:
        return _answer(self.provider.update_mapping, mapping)

    def delete_mapping(self, client_identifier: str, participant_context: str) -> Deferred[bool]:
        return _answer(self.provider.delete_mapping, client_identifier, participant_context)

    def delete_client_mappings(self, client_identifier: str) -> Deferred[int]:
        return _answer(self.provider.delete_client_mappings, client_identifier)

    def add_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return _answer(self.provider.add_scope, scope)

    def get_scope(self, scope: str) -> Deferred[ScopeMapping]:
        return _answer(self.provider.get_scope, scope)

    def list_scopes(self) -> Deferred[Sequence[ScopeMapping]]:
        return _answer(self.provider.list_scopes)

    def update_scope(self, scope: ScopeMapping) -> Deferred[None]:
        return _answer(self.provider.update_scope, scope)

    def delete_scope(self, scope: str) -> Deferred[bool]:
        return _answer(self.provider.delete_scope, scope)

    def resolve(self, client_identifier: str, participant_context: str, scopes: Sequence[str]) -> Deferred[Resolution]:
        return _answer(self.provider.resolve, client_identifier, participant_context, scopes)

    def add_integration(self, integration: Integration) -> Deferred[None]:
        return _answer(self.provider.add_integration, integration)

    def list_integrations(self) -> Deferred[Sequence[Integration]]:
        return _answer(self.provider.list_integrations)

    def add_api_key(self, record: ApiKeyRecord) -> Deferred[None]:
        return _answer(self.provider.add_api_key, record)

    def get_api_key(self, integration_id: str, key_id: str) -> Deferred[ApiKeyRecord]:
        return _answer(self.provider.get_api_key, integration_id, key_id)

    def revoke_api_key(self, integration_id: str, key_id: str) -> Deferred[bool]:
        return _answer(self.provider.revoke_api_key, integration_id, key_id)

    @property
    def records_token_ids(self) -> bool:
        return IReplayRecord.providedBy(self.provider)

    def record_token_id(self, issuer: str, token_id: str, expires_at: float) -> Deferred[bool]:
        """Only called when :attr:`records_token_ids`."""
        record: Callable[[str, str, float], Answer[bool]] = self.provider.record_token_id  # type: ignore[attr-defined]
        return _answer(record, issuer, token_id, expires_at)


@implementer(ISigner)
@attrs.frozen
class Signer(_Adapter):
    provider: ISigner

    @property
    def algorithm(self) -> str:
        return str(self.provider.algorithm)

    def sign(self, header: JSONObject, claims: JSONObject) -> Deferred[str]:
        return _answer(self.provider.sign, header, claims)

    def public_jwks(self) -> Deferred[JSONObject]:
        return _answer(self.provider.public_jwks)


Adapted = Union[Validator, Store, Signer]

_ADAPTERS: dict[str, type[Validator] | type[Store] | type[Signer]] = {
    "validator": Validator,
    "store": Store,
    "signer": Signer,
}


@overload
def adapt(kind: Literal["validator"], provider: object) -> Validator: ...
@overload
def adapt(kind: Literal["store"], provider: object) -> Store: ...
@overload
def adapt(kind: Literal["signer"], provider: object) -> Signer: ...
@overload
def adapt(kind: str, provider: object) -> Adapted: ...


def adapt(kind: str, provider: object) -> Adapted:
    """
    Wrap ``provider`` (of ``kind`` "validator", "store" or "signer") in its
    typed adapter.  Adapting an adapter returns it unchanged, so a caller need
    not know whether a provider was already adapted.
    """
    adapter_type = _ADAPTERS[kind]
    if isinstance(provider, adapter_type):
        return provider
    return adapter_type(provider)  # type: ignore[arg-type]
