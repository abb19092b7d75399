"""
The ``api-key`` validator: API keys (``<prefix>.<integration>.<key_id>.<secret>``)
checked against the store, for deployments that validate keys through the
generic Validator interface.  The checking is the API-key exchange's own
(:class:`jwtlet.exchange.apikeys.ApiKeyValidator`), so a key is the same
identity on either path; this module only reads the plugin's options.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.config.reader import SectionReader, as_nonempty_str, no_dots
from jwtlet.exchange.apikeys import ApiKeyValidator, ApiKeyVerifier
from jwtlet.interfaces import IValidatorFactory, PluginConfigError, PluginContext


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class ApiKeyValidatorFactory:
    name: str = "api-key"
    description: str = "validates API keys against the digests in the mapping store"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> ApiKeyValidator:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        configured = context.config.api_keys
        prefix = section.get("prefix", as_nonempty_str, configured.prefix if configured is not None else "jwtk",
                             check=no_dots)
        section.finish()
        if context.store is None:
            section.problem("type", "the api-key validator needs a store")
        if problems:
            raise PluginConfigError(*problems)
        return ApiKeyValidator(ApiKeyVerifier(context.store, prefix))


api_key = ApiKeyValidatorFactory()
