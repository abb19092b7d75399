"""Kubernetes: service-account identities and the TokenRequest client."""
