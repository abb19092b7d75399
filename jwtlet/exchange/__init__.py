"""The exchange pipeline: validate, resolve, check, claims, sign — for RFC 8693, API keys and ext_authz."""
