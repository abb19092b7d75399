"""
Fakes of the systems jwtlet talks to (Kubernetes API server, Vault, Envoy),
served over real HTTP on loopback, for jwtlet's tests and for users' own.
"""
