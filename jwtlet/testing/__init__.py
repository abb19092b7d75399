"""
What jwtlet's tests use and users' own tests may reuse.

Fakes of the systems jwtlet talks to (``kubernetes``: the API server,
``vault``: Vault transit, ``envoy``: Envoy's ext_authz client), stand-ins for
providers (``fakes``), the real daemon as a subprocess (``process``) and a
throwaway PostgreSQL (``postgres``).  HTTP fakes are ``IResource``s, served in
memory (``memory``: no socket, no global reactor) or over real HTTP on
loopback (``loopback``).  These modules import only what ``pip install
jwtlet`` installs.

The conformance suites are in :mod:`jwtlet.testing.conformance`, which needs
the test extra (``pip install jwtlet[test]``).
"""
