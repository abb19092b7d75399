"""
The ``api-key`` validator: API keys (``<prefix>.<integration>.<key_id>.<secret>``)
checked against the store, for deployments that validate keys through the
generic Validator interface.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.exchange.apikeys import ApiKeyVerifier, InvalidKey
from jwtlet.interfaces import IValidator, IValidatorFactory, PluginConfigError, PluginContext, TokenRejected
from jwtlet.model import Identity

ISSUER = "jwtlet:api-key"


@implementer(IValidator)
@attrs.define
class ApiKeyValidator:
    verifier: ApiKeyVerifier

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        return ensureDeferred(self._validate(token))

    async def _validate(self, token: str) -> Identity:
        try:
            record = await self.verifier.verify(token)
        except InvalidKey:
            raise TokenRejected("invalid API key") from None
        return Identity(
            username=f"apikey:{record.integration_id}:{record.key_id}",
            issuer=ISSUER,
            extra={"tier": record.tier},
        )


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class ApiKeyValidatorFactory:
    name: str = "api-key"
    description: str = "validates API keys against the digests in the mapping store"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> ApiKeyValidator:
        problems = [f"{key}: unknown key" for key in options if key != "prefix"]
        configured = getattr(context.config, "api_keys", None)
        prefix = options.get("prefix", configured.prefix if configured is not None else "jwtk")
        if not isinstance(prefix, str) or not prefix or "." in prefix:
            problems.append("prefix: must be a non-empty string without '.'")
        if context.store is None:
            problems.append("type: the api-key validator needs a store")
        if problems:
            raise PluginConfigError(*problems)
        return ApiKeyValidator(ApiKeyVerifier(context.store, prefix))


api_key = ApiKeyValidatorFactory()
